"""Distillation (distill.py, train.py --distill_steps): the target's arithmetic against the
sampler's own DDIM, the CFG-scale input, and end to end on a tiny shapes set: a short run lowers the
student's error against two teacher steps, resumes bit-identically after a kill, a guidance round
matches the teacher's CFG output, and sample.py samples a student as it was trained without flags.
The DiT, the UNet, VP and latents go through the same loop."""

import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import distill
from checkpoint import load_model
from conftest import one_error_line, one_line_exit
from data import Data
from diffusion import Diffusion
from samplers import guided, sample_loop
from model import build_model
from test_train import KILL_MID_WRITE, TINY, assert_same_run, run, run_with, train, weights

pytestmark = pytest.mark.usefixtures('one_thread')
CPU = torch.device('cpu')
UNET = dict(
    arch='unet',
    input_size=8,
    in_channels=3,
    channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    n_head=2,
    num_classes=3,
)
DIT = dict(
    arch='dit',
    input_size=8,
    in_channels=3,
    patch_size=2,
    n_layer=2,
    n_head=2,
    n_embd=32,
    num_classes=3,
)


def teacher_fn(x, t):
    """A fixed non-linear 'network' of (x, t): its DDIM steps do not compose into one."""
    t = torch.as_tensor(t, dtype=torch.float32).view(-1, 1, 1, 1) / 1000
    return torch.tanh(1.5 * x + 0.3) * (0.5 + t) + 0.2 * x.roll(1, -1)


@pytest.mark.parametrize(
    'diffusion',
    [Diffusion('flow'), Diffusion('vp', 'cosine', 'v'), Diffusion('vp', 'linear', 'x0')],
)
@pytest.mark.parametrize('sub', [2, 4])
def test_target_makes_one_student_step_land_on_the_teachers_steps(diffusion, sub):
    """From pure noise (steps=1): the student's one DDIM step with the target output lands where
    sample_loop's DDIM with the teacher, `sub` steps (2: Salimans & Ho; 4: a first round's finer
    teacher), lands (to 1e-5). Inside the grid (steps=4, each of the 4 student steps): the student's
    DDIM step (written out here) lands on the teacher's."""
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(4, 3, 8, 8, generator=g).clamp(-1, 1),
        torch.randn(4, 3, 8, 8, generator=g),
    )
    fn = lambda x, t: teacher_fn(
        x, diffusion.model_time(torch.as_tensor(t, dtype=torch.float64)).float()
    )
    x_t, t, target = distill.distill_target(
        diffusion, fn, x0, noise, None, torch.rand(4, generator=g), 1, sub
    )
    teacher, _ = sample_loop(fn, x_t, diffusion, sub, 'ddim', spacing='flowtime')
    student, _ = sample_loop(lambda x, t: target, x_t, diffusion, 1, 'ddim', spacing='flowtime')
    torch.testing.assert_close(student, teacher, rtol=0, atol=1e-5)
    times, A, S = diffusion.sampling_schedule(4 * sub, 'flowtime')
    # example i takes student step i
    u = (torch.arange(4) + 0.5) / 4
    x_t, t, target = distill.distill_target(diffusion, fn, x0, noise, None, u, 4, sub)
    assert torch.equal(t, times[::sub])
    for i in range(4):
        k, a, s = sub * i, A[sub * i].item(), S[sub * i].item()
        z = x_t[i : i + 1]
        # the teacher
        for j in range(k, k + sub):
            x0_hat = diffusion.to_x0(fn(z, times[j : j + 1]), z, A[j].item(), S[j].item())
            z = (
                A[j + 1].item() * x0_hat
                + S[j + 1].item() * (z - A[j].item() * x0_hat) / S[j].item()
            )
        # the student, from its target output
        x0_s = diffusion.to_x0(target[i : i + 1], x_t[i : i + 1], a, s)
        step = A[k + sub].item() * x0_s + S[k + sub].item() * (x_t[i : i + 1] - a * x0_s) / s
        torch.testing.assert_close(step, z, rtol=0, atol=1e-5)


def test_teacher_substeps_per_round():
    """The first round of steps takes teacher_steps // steps teacher steps (its teacher is the
    trained model), the rest 2 (a student's own grid), a guidance round 1; 0 = Salimans & Ho's 2
    everywhere."""
    sub = distill.teacher_substeps
    assert sub([4, 2, 1], 16) == [4, 2, 2] and sub([4, 2, 1], 0) == [2, 2, 2]
    assert sub([0, 4, 2], 32) == [1, 8, 2] and sub([0], 0) == [1] and sub([0], 8) == [1]


@pytest.mark.parametrize('arch', ['dit', 'unet'])
def test_cfg_scale_input_starts_as_the_conditional_model(arch):
    """A student's CFG-scale input (guidance=True) has a zero last layer: with the teacher's weights
    it is the teacher's conditional model at every scale; once that layer moves, the scale changes
    the output."""
    args = UNET if arch == 'unet' else DIT
    torch.manual_seed(0)
    base = build_model(args).eval()
    with torch.no_grad():
        for p in base.parameters():
            # a trained-looking model (zero inits moved)
            p.add_(0.05 * torch.randn_like(p))
    student = build_model(dict(args, guidance=True)).eval()
    missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith('g_embed.') for k in missing)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([0, 2])
    with torch.no_grad():
        want = base(x, t, y)
        for w in (1.0, 4.0):
            torch.testing.assert_close(
                student(x, t, y, guidance=torch.full((2,), w)), want, rtol=0, atol=0
            )
        torch.nn.init.normal_(student.g_embed[-1].weight, std=0.1)
        assert (
            student(x, t, y, guidance=torch.full((2,), 4.0))
            - student(x, t, y, guidance=torch.ones(2))
        ).abs().max() > 1e-3


def test_guided_takes_one_scale_per_image_or_the_scale_as_an_input():
    """guided() with a [B] tensor of scales = each image at its own scalar scale; with scale_input,
    one call with the scale passed as guidance= (no unconditional half)."""
    torch.manual_seed(0)
    model = build_model(UNET).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d, x, y = Diffusion('flow'), torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    w = torch.tensor([1.0, 2.5, 6.0])
    with torch.no_grad():
        both = guided(model, d, y, 3, w)(x, 0.4)
        for i in range(3):
            one = guided(model, d, y[i : i + 1], 3, w[i].item())(x[i : i + 1], 0.4)
            # batch size: conv rounding
            torch.testing.assert_close(both[i : i + 1], one, rtol=1e-4, atol=2e-5)
        calls = []
        spy = lambda *a, **kw: calls.append((len(a[0]), kw['guidance'].tolist())) or model(*a[:4])
        guided(spy, d, y, 3, w, scale_input=True)(
            x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        )
        assert calls == [(3, w.tolist())]


# ---- end to end: train.py and sample.py on a tiny shapes set


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'shapes')
    run(['prepare.py', '--num_train=192', '--num_val=16', f'--out_dir={d}'])
    return d


@pytest.fixture(scope='module')
def teacher(data, tmp_path_factory):
    """A tiny DiT trained for 40 steps: enough that its DDIM steps are far from linear and CFG
    changes its output."""
    out = tmp_path_factory.mktemp('teacher')
    train(data, out, '--max_iters=40', '--eval_interval=0', '--lr=3e-3')
    return out


def student_error(student_dir, teacher_dir, data, steps, name='ckpt.pt', w=4.0):
    """RMS of (student output - its target: two DDIM steps of the teacher, CFG at w) on the val
    split, per student step, the same noise for every model."""
    st, diffusion, _, _ = load_model(os.path.join(student_dir, name), CPU)
    te = load_model(os.path.join(teacher_dir, 'ckpt.pt'), CPU)[0]
    val = Data(data, 'val', CPU)
    x0, y = val.get(list(range(len(val))))
    g = torch.Generator().manual_seed(0)
    noise, u = torch.randn(x0.shape, generator=g), (torch.arange(len(y)) % steps + 0.5) / steps
    wv = torch.full((len(y),), w)
    with torch.no_grad():
        x_t, t, target = distill.distill_target(
            diffusion, guided(te, diffusion, y, 12, wv), x0, noise, None, u, steps
        )
        out = guided(st, diffusion, y, 12, wv, scale_input=st.config.guidance)(x_t, t)
    return (out - target).pow(2).mean().sqrt().item()


def test_distillation_lowers_the_error_and_resumes_exactly_after_a_kill(data, teacher, tmp_path):
    """Rounds (2, 1), 12 steps each: each round's student is kept, records its steps and grid, and
    its error against two steps of its teacher (the first round: the base model with CFG at 4) is
    well below the error it started with (its teacher's own one step). Killed mid-write of its 3rd
    checkpoint (round 2), resumed: bit-identical, teacher too."""
    a, b = tmp_path / 'a', tmp_path / 'b'
    args = [
        f'--init_from={teacher}/ckpt.pt',
        '--distill_steps=(2, 1)',
        '--max_iters=24',
        '--eval_interval=6',
        '--lr=1e-3',
        '--lr_decay_iters=0',
        '--ema_start=100',
        '--distill_cfg=(3.0, 5.0)',
    ]
    p = train(data, a, *args)
    assert '2-step student' in p.stdout and '1-step student' in p.stdout
    # the student starts as the teacher: one step of it
    before = student_error(teacher, teacher, data, 2)
    after = student_error(a, teacher, data, 2, 'student2.pt')
    assert after < 0.5 * before, (before, after)
    ckpt = weights(a)
    assert (
        ckpt['config']['student'] == dict(steps=1, t=[1.0], cfg=[3.0, 5.0])
        and ckpt['model_args']['guidance']
    )
    s2 = torch.load(a / 'student2.pt', weights_only=True)
    assert s2['config']['student']['steps'] == 2 and s2['config']['student']['t'] == [1.0, 0.5]
    # round 2's teacher: round 1's student
    torch.testing.assert_close(ckpt['teacher']['weights'], s2['ema'], rtol=0, atol=0)
    common = [f'--data_dir={data}', f'--out_dir={b}'] + TINY + args
    p = run_with(KILL_MID_WRITE.format(n=3, name='ckpt.pt'), common)
    assert (
        p.returncode == -signal.SIGKILL
        and torch.load(b / 'ckpt.pt', weights_only=True)['step'] == 12
    )
    p = train(data, b, *args[1:], '--init_from=resume')
    assert 'at step 12' in p.stdout
    assert_same_run(ckpt, weights(b))
    torch.testing.assert_close(
        weights(b)['teacher']['weights'], ckpt['teacher']['weights'], rtol=0, atol=0
    )


def test_a_bf16_cpu_round_lowers_the_error_as_fp32_does(data, teacher, tmp_path):
    """config/distill_shapes.py autocasts to bf16 on the CPU (1.4x the speed there): teacher target,
    student loss and the round-end eval run under it, and the same short round's student ends within
    10% of the fp32 run's error and well under its start (its teacher's one step)."""
    args = [
        f'--init_from={teacher}/ckpt.pt',
        '--distill_steps=(2,)',
        '--max_iters=12',
        '--eval_interval=0',
        '--lr=1e-3',
        '--lr_decay_iters=0',
        '--ema_start=100',
        '--distill_cfg=(3.0, 5.0)',
    ]
    p = train(data, tmp_path / 'bf16', *args, '--dtype=bfloat16')
    assert 'cpu torch.bfloat16' in p.stdout and '2-step student' in p.stdout
    train(data, tmp_path / 'fp32', *args)
    before = student_error(teacher, teacher, data, 2)
    bf16, fp32 = (student_error(tmp_path / d, teacher, data, 2) for d in ('bf16', 'fp32'))
    assert bf16 < 0.5 * before and abs(bf16 - fp32) < 0.1 * fp32, (before, bf16, fp32)


def test_guidance_round_matches_the_teachers_cfg_output(data, teacher, tmp_path):
    """distill_steps=(0,): the student learns the teacher's CFG output at the scale it is trained
    for (3), at any t, in one call. Tolerance: its error |student - teacher CFG| is under 0.45 of
    the guidance term |teacher cond - teacher CFG| (where it starts: it is the conditional model)
    after 200 steps, on val images and noise it never saw (measured: 0.34). The teacher's class
    embedding is scaled 30x: the tiny 40-step teacher barely uses its label."""
    ckpt = torch.load(teacher / 'ckpt.pt', weights_only=True)
    for key in ('model', 'ema'):
        ckpt[key]['y_embed.weight'] *= 30
    strong = tmp_path / 'strong.pt'
    torch.save(ckpt, strong)
    train(
        data,
        tmp_path,
        f'--init_from={strong}',
        '--distill_steps=(0,)',
        '--distill_cfg=(3.0, 3.0)',
        '--max_iters=200',
        '--eval_interval=0',
        '--lr=1e-3',
        '--lr_decay_iters=0',
        '--ema_start=1000',
        '--class_dropout=0',
    )
    st, diffusion, _, _ = load_model(str(tmp_path / 'ckpt.pt'), CPU)
    te = load_model(str(strong), CPU)[0]
    val = Data(data, 'val', CPU)
    x0, y = val.get(list(range(len(val))))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(len(y), generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = (1 - t.float().view(-1, 1, 1, 1)) * x0 + t.float().view(-1, 1, 1, 1) * torch.randn(
        x0.shape, generator=g
    )
    with torch.no_grad():
        cfg = guided(te, diffusion, y, 12, 3.0)(x_t, t)
        cond = guided(te, diffusion, y, 12, 1.0)(x_t, t)
        student = guided(st, diffusion, y, 12, 3.0, scale_input=True)(x_t, t)
    rel = ((student - cfg).norm() / (cond - cfg).norm()).item()
    assert rel < 0.45, rel


def test_sample_uses_the_students_steps_and_grid_without_flags(
    data, teacher, tmp_path, monkeypatch
):
    train(
        data,
        tmp_path,
        f'--init_from={teacher}/ckpt.pt',
        '--distill_steps=(2,)',
        '--max_iters=2',
        '--eval_interval=0',
    )
    p = run(
        [
            'sample.py',
            f'--out_dir={tmp_path}',
            '--ckpt_name=model.safetensors',
            '--per_class=1',
            '--device=cpu',
            # the export keeps the record
            '--cfg_scale=8',
        ]
    )
    assert (
        "ddim the student's grid, 2 steps" in p.stdout and 'learned CFG scales 1 to 6' in p.stdout
    )
    import sample

    record = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['config']['student']
    monkeypatch.setattr(sample, 'steps', 2)
    assert sample.solver_settings(Diffusion(), {}, None, record)[0]['spacing'] == [1.0, 0.5]
    # other steps (or a sampler, a spacing) asked for: those
    monkeypatch.setattr(sample, 'steps', 3)
    assert (
        sample.solver_settings(Diffusion(), {}, None, record)[0]
        == sample.solver_settings(Diffusion(), {}, None)[0]
    )


@pytest.mark.parametrize(
    'args',
    [
        ['--distill_steps=(4, 3)'],
        ['--distill_steps=(2, 0)'],
        ['--distill_steps=(2, 1)', '--max_iters=3'],
        ['--distill_steps=(2,)', '--distill_cfg=(4.0, 1.0)'],
        ['--distill_steps=(4, 2)', '--distill_teacher_steps=6'],
        ['--distill_steps=(2, 1)', '--distill_iters=(1, 2)'],
        ['--distill_steps=(2,)', '--distill_iters=(1, 1)'],
    ],
)
def test_bad_distillation_settings_are_one_line(data, teacher, tmp_path, args):
    p = train(data, tmp_path, f'--init_from={teacher}/ckpt.pt', '--max_iters=2', *args, check=False)
    one_error_line(p, '--distill_')


def test_uneven_rounds_end_where_distill_iters_says(data, teacher, tmp_path):
    """distill_iters=(3, 2): round 1 ends (and its student is kept) at step 3, not at half of
    max_iters; each round's LR schedule restarts and decays over its own length."""
    p = train(
        data,
        tmp_path,
        f'--init_from={teacher}/ckpt.pt',
        '--distill_steps=(2, 1)',
        '--max_iters=5',
        '--distill_iters=(3, 2)',
        '--eval_interval=0',
        '--log_interval=1',
        '--warmup_iters=0',
        '--lr=1e-3',
        '--min_lr=1e-4',
        '--lr_decay_iters=0',
    )
    # 'step 3/5 (60%) | loss ...' (the log) and 'step 3 | val loss ...' (an evaluation, after it)
    at = lambda line: int(line.split()[1].split('/')[0])
    lines = {at(l): l for l in p.stdout.splitlines() if l.startswith('step ')}
    assert (
        '2-step student' in lines[3]
        and '1-step student' in lines[5]
        and 'student' not in lines[2] + lines[4]
    )
    assert torch.load(tmp_path / 'student2.pt', weights_only=True)['step'] == 3
    lrs = {
        at(l): float(l.split('| lr ')[1].split()[0]) for l in p.stdout.splitlines() if '| lr ' in l
    }
    # 2/3 of round 1's cosine
    assert lrs[1] == lrs[4] == 1e-3 and lrs[3] == pytest.approx(1e-4 + 0.25 * 9e-4, rel=1e-2)


def test_teachers_that_cannot_be_distilled_are_one_line(data, teacher, tmp_path):
    # no teacher
    p = train(data, tmp_path / 'a', '--distill_steps=(2,)', '--max_iters=2', check=False)
    one_error_line(p, 'needs a teacher')
    ckpt = torch.load(teacher / 'ckpt.pt', weights_only=True)
    eps = dict(ckpt, config=dict(ckpt['config'], objective='vp', prediction='eps'))
    one_line_exit(
        lambda: distill.student_args(eps, 'eps.pt', 12, 2), 'cannot distil eps.pt', 'predicts eps'
    )
    student = dict(
        ckpt, config=dict(ckpt['config'], student=dict(steps=2, t=[1.0, 0.5], cfg=[1.0, 6.0]))
    )
    one_line_exit(
        lambda: distill.student_args(student, 's.pt', 12, 2), 'is a 2-step student: distil it to 1'
    )
    assert distill.student_args(student, 's.pt', 12, 1)['guidance']
    one_line_exit(
        lambda: distill.student_args(student, 's.pt', 12, 1, 4), 'samples only its own grid'
    )
    branch = dict(ckpt, model_args=dict(ckpt['model_args'], hint_channels=1, hint_size=32))
    one_line_exit(lambda: distill.student_args(branch, 'b.pt', 12, 2), 'has a control branch')


def test_two_process_ddp_and_accumulation_equal_one_process(data, teacher, tmp_path):
    """The same loop: 2 processes x 2 micro-batches of 2 = one process with a batch of 8, across a
    round boundary (the first round's teacher taking 4 steps per student step)."""
    args = [
        f'--init_from={teacher}/ckpt.pt',
        '--distill_steps=(2, 1)',
        '--max_iters=4',
        '--eval_interval=0',
        '--distill_teacher_steps=8',
    ]
    one, two = tmp_path / 'one', tmp_path / 'two'
    train(data, one, *args, '--batch_size=8')
    run(
        [
            '-m',
            'torch.distributed.run',
            '--standalone',
            '--nproc_per_node=2',
            'train.py',
            f'--data_dir={data}',
            f'--out_dir={two}',
        ]
        + TINY
        + args
        + ['--batch_size=2', '--gradient_accumulation_steps=2'],
        timeout=300,
    )
    assert_same_run(weights(one), weights(two), atol=1e-5)


@pytest.mark.parametrize(
    'arch', [['--arch=unet', '--unet_channels=8', '--objective=vp', '--prediction=v']]
)
def test_unet_and_vp_teachers_distil_and_sample(data, tmp_path, arch):
    """A UNet VP (v) model (the DiT flow model is above; VP's target arithmetic is checked exactly):
    a round's loss falls from its start (the teacher's own one step), the student samples with its
    grid."""
    train(data, tmp_path / 't', *arch, '--max_iters=20', '--eval_interval=0', '--lr=3e-3')
    p = train(
        data,
        tmp_path / 's',
        *arch,
        f'--init_from={tmp_path}/t/ckpt.pt',
        '--distill_steps=(1,)',
        '--max_iters=16',
        '--eval_interval=0',
        '--ema_start=100',
        '--lr_decay_iters=0',
        '--lr=3e-3',
    )
    losses = [
        float(l.split('loss ')[1].split()[0])
        for l in p.stdout.splitlines()
        if l.startswith('step') and '| lr' in l
    ]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    p = run(['sample.py', f'--out_dir={tmp_path}/s', '--per_class=1', '--device=cpu'])
    assert "ddim the student's grid, 1 steps" in p.stdout


def test_rounds_weigh_the_x0_error_by_truncated_snr():
    """Salimans & Ho's max(SNR, 1) |x0 error|^2, written for the output: flow's velocity error is
    |x0 error| / t."""
    d, t = Diffusion('flow'), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    snr = ((1 - t) / t) ** 2
    torch.testing.assert_close(
        d.min_snr_weight(t, float('inf'), floor=1.0), (snr.clamp(min=1) * t**2).float()
    )
    v = Diffusion('vp', 'cosine', 'v')
    tv = torch.tensor([999.0, 500.0, 100.0], dtype=torch.float64)
    a, s = v.alpha_sigma(tv)
    torch.testing.assert_close(
        v.min_snr_weight(tv, float('inf'), floor=1.0), ((a / s) ** 2).clamp(min=1).mul(s**2).float()
    )


@pytest.mark.parametrize('arch', ['dit', 'unet'])
def test_a_student_compiles_without_graph_breaks(arch):
    """fullgraph=True through the CFG-scale input, forward and backward (aot_eager: the graph, not
    the kernels)."""
    args = dict(UNET if arch == 'unet' else DIT, guidance=True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(args)
    torch.nn.init.normal_(model.g_embed[-1].weight, std=0.1)
    x, t, y, w = (
        torch.randn(2, 3, 8, 8),
        torch.tensor([100.0, 700.0]),
        torch.tensor([0, 2]),
        torch.tensor([1.5, 4.0]),
    )
    want = model(x, t, y, guidance=w)
    got = torch.compile(model, backend='aot_eager', fullgraph=True)(x, t, y, guidance=w)
    got.pow(2).mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.g_embed[0].weight.grad is not None


def optimizer_state(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['optimizer']['state']


def assert_same_optimizer(a, b):
    assert a.keys() == b.keys()
    for i in a:
        for k in a[i]:
            torch.testing.assert_close(a[i][k], b[i][k], rtol=0, atol=0, msg=f"state {i}.{k}")


def test_reset_optim_clears_the_moments_each_later_round_and_resumes_exactly(
    data, teacher, tmp_path
):
    """distill_reset_optim: rounds of 2 and 3 steps. Round 1 is the carried run's, bit for bit (the
    reset is at a later round's start); at the end AdamW has counted round 2's 3 steps, not 5, and
    its moments differ from the carried run's. Killed after the checkpoint at the round boundary
    (resume: the round starts again, reset) or mid-round (resume: no reset), resumed: the same
    weights and moments as the uninterrupted run."""
    args = [
        f'--init_from={teacher}/ckpt.pt',
        '--distill_steps=(2, 1)',
        '--max_iters=5',
        '--distill_iters=(2, 3)',
        '--eval_interval=1',
        '--lr_decay_iters=0',
    ]
    carried, reset = tmp_path / 'carried', tmp_path / 'reset'
    train(data, carried, *args)
    train(data, reset, *args, '--distill_reset_optim=True')
    s2 = [torch.load(d / 'student2.pt', weights_only=True) for d in (carried, reset)]
    assert_same_run(*s2)
    assert_same_optimizer(s2[0]['optimizer']['state'], s2[1]['optimizer']['state'])
    kept, cleared = optimizer_state(carried), optimizer_state(reset)
    assert {s['step'].item() for s in kept.values()} == {5.0}
    assert {s['step'].item() for s in cleared.values()} == {3.0}
    assert not torch.equal(kept[0]['exp_avg_sq'], cleared[0]['exp_avg_sq'])
    # the 3rd ckpt.pt write is step 3's (the last is step 2's, where round 2 starts); the 4th,
    # step 4's (the last is step 3's, mid-round)
    for n, last in ((3, 2), (4, 3)):
        out = tmp_path / f'killed{n}'
        common = [f'--data_dir={data}', f'--out_dir={out}'] + TINY
        common += args + ['--distill_reset_optim=True']
        p = run_with(KILL_MID_WRITE.format(n=n, name='ckpt.pt'), common)
        assert p.returncode == -signal.SIGKILL and weights(out)['step'] == last
        p = train(data, out, *args[1:], '--init_from=resume', '--distill_reset_optim=True')
        assert f'at step {last}' in p.stdout
        assert_same_run(weights(reset), weights(out))
        assert_same_optimizer(cleared, optimizer_state(out))
