"""train.py and sample.py end to end on a tiny model and a tiny shapes set (CPU, seconds each)."""

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line, python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', TQDM_DISABLE='1')
TINY = [
    '--patch_size=4',
    '--n_layer=2',
    '--n_head=2',
    '--n_embd=32',
    '--batch_size=8',
    '--lr=1e-3',
    '--warmup_iters=2',
    '--lr_decay_iters=40',
    '--ema_start=3',
    '--ema_decay=0.9',
    '--eval_batches=1',
    '--log_interval=1',
    '--sample_steps=2',
    '--compile=False',
    '--device=cpu',
]


def run(args, check=True, **kw):
    p = python(args, ROOT, ENV, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'shapes')
    run(['prepare.py', '--num_train=192', '--num_val=16', f'--out_dir={d}'])
    return d


def train(data, out, *extra, check=True):
    return run(
        ['train.py', f'--data_dir={data}', f'--out_dir={out}'] + TINY + list(extra), check=check
    )


def weights(out):
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    return ckpt


def assert_same_run(a, b, atol=0.0):
    for key in ('model', 'ema'):
        for name in a[key]:
            torch.testing.assert_close(
                a[key][name], b[key][name], rtol=0, atol=atol, msg=f"{key}.{name}"
            )
    assert a['step'] == b['step']


@pytest.mark.parametrize('arch', ['--arch=dit', '--arch=unet'])
def test_loss_goes_down(data, tmp_path, arch):
    p = train(
        data,
        tmp_path,
        arch,
        '--unet_channels=16',
        '--lr=3e-3',
        '--max_iters=60',
        '--eval_interval=0',
    )
    losses = [
        float(l.split('loss ')[1].split()[0])
        for l in p.stdout.splitlines()
        if l.startswith('step') and '| lr' in l
    ]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10])
    assert os.path.exists(tmp_path / 'samples_000060.png')


def run_with(patch, args):
    """train.py as a process with `patch` (Python source) applied first: faults injected at exact
    points."""
    code = (
        f"import runpy, sys\nsys.argv = {['train.py'] + args!r}\n{textwrap.dedent(patch)}\n"
        f"runpy.run_path('train.py', run_name='__main__')\n"
    )
    return python(['-c', code], ROOT, ENV)


KILL_MID_WRITE = """
import io, os, signal, checkpoint
real, writes = checkpoint.atomic_write, []
# the {n}th write of {name}: half of it reaches the disk, then SIGKILL
def atomic_write(path, write):
    if path.endswith('{name}'):
        writes.append(path)
        if len(writes) == {n}:
            buf = io.BytesIO()
            write(buf)
            with open(f"{{path}}.{{os.getpid()}}.tmp", 'wb') as f:
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, write)
checkpoint.atomic_write = atomic_write
"""


def test_killed_mid_checkpoint_then_resumed_equals_uninterrupted(data, tmp_path):
    """Deterministic: SIGKILL half-way through writing a checkpoint (run 1 at its 3rd ckpt.pt, run 2
    at its 2nd best.pt), resume each time: the last checkpoint is always readable, best.pt is never
    older than the best ckpt.pt knows of, the torn temporary is cleaned up, and the end result is
    bit-identical to a run that was never interrupted."""
    a, b = tmp_path / 'a', tmp_path / 'b'
    args = ['--max_iters=8', '--eval_interval=1']
    train(data, a, *args)
    common = [f'--data_dir={data}', f'--out_dir={b}'] + TINY + args
    p = run_with(KILL_MID_WRITE.format(n=3, name='ckpt.pt'), common)
    # died leaving a torn temporary file
    assert p.returncode == -signal.SIGKILL and list(b.glob('*.tmp'))
    # the previous checkpoint, intact
    assert torch.load(b / 'ckpt.pt', weights_only=True)['step'] == 2
    p = run_with(KILL_MID_WRITE.format(n=2, name='best.pt'), common + ['--init_from=resume'])
    assert (
        p.returncode == -signal.SIGKILL and 'resuming from' in p.stdout and 'at step 2' in p.stdout
    )
    ckpt, best = (torch.load(b / f, weights_only=True) for f in ('ckpt.pt', 'best.pt'))
    # best.pt is written first: never behind ckpt.pt
    assert best['best_val'] <= ckpt['best_val']
    p = train(data, b, *args, '--init_from=resume')
    assert f"at step {ckpt['step']}" in p.stdout and not list(b.glob('*.tmp'))
    assert_same_run(weights(a), weights(b))


@pytest.mark.skipif(
    os.environ.get('NANODIFFUSION_STRESS') != '1',
    reason='stress test (wall-clock timing): '
    'NANODIFFUSION_STRESS=1 runs it; the deterministic kill test above always runs',
)
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(data, tmp_path):
    """Stress: killed with SIGKILL 4 times at random moments (a checkpoint is written every step, so
    some kills land mid-write), resumed each time: no checkpoint is ever unreadable and the end
    result is bit-identical."""
    import random
    import time

    a, b = tmp_path / 'a', tmp_path / 'b'
    args = ['--max_iters=30', '--eval_interval=1']
    train(data, a, *args)
    rng, kills = random.Random(0), 0
    while kills < 4:
        resume = ['--init_from=resume'] if (b / 'ckpt.pt').exists() else []
        proc = subprocess.Popen(
            [sys.executable, 'train.py', f'--data_dir={data}', f'--out_dir={b}']
            + TINY
            + args
            + resume,
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(2.5, 5.0))
        proc.send_signal(signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:
            # it finished first: nothing left to interrupt
            break
        kills += 1
        if (b / 'ckpt.pt').exists():
            # never a torn file
            assert torch.load(b / 'ckpt.pt', weights_only=True)['step'] >= 1
    assert kills >= 2, "the run finished before it could be interrupted: make it longer"
    p = train(data, b, *args, '--init_from=resume')
    resumed_at = int(p.stdout.split('at step ')[1].split()[0])
    assert 1 <= resumed_at < 30
    assert_same_run(weights(a), weights(b))


def test_resume_refuses_a_different_model(data, tmp_path):
    train(data, tmp_path, '--max_iters=1')
    p = train(data, tmp_path, '--max_iters=2', '--init_from=resume', '--n_layer=3', check=False)
    one_error_line(p, 'n_layer 2 -> 3', '--force=True')
    # forced, the weights still cannot go into another network
    p = train(data, tmp_path, '--init_from=resume', '--n_layer=3', '--force=True', check=False)
    assert p.returncode != 0
    assert 'n_layer=2 in checkpoint vs 3 now' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.parametrize(
    'per_process', [['--batch_size=4'], ['--batch_size=2', '--gradient_accumulation_steps=2']]
)
def test_two_process_ddp_equals_one_process(data, tmp_path, per_process):
    one, two = tmp_path / 'one', tmp_path / 'two'
    train(data, one, '--max_iters=4', '--eval_interval=0', '--batch_size=8')
    run(
        [
            '-m',
            'torch.distributed.run',
            '--standalone',
            '--nproc_per_node=2',
            'train.py',
            f'--data_dir={data}',
            f'--out_dir={two}',
            '--max_iters=4',
            '--eval_interval=0',
        ]
        + TINY
        + per_process,
        timeout=300,
    )
    # the same examples, noise and labels; only the order of the float sums differs
    assert_same_run(weights(one), weights(two), atol=1e-5)


def test_gradient_accumulation_equals_big_batch(data, tmp_path):
    big, acc = tmp_path / 'big', tmp_path / 'acc'
    train(data, big, '--max_iters=4', '--eval_interval=0', '--batch_size=8')
    train(
        data,
        acc,
        '--max_iters=4',
        '--eval_interval=0',
        '--batch_size=4',
        '--gradient_accumulation_steps=2',
    )
    assert_same_run(weights(big), weights(acc), atol=1e-5)


def test_ema_warmup(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train.py'])
    train_mod = importlib.import_module('train')
    monkeypatch.setattr(train_mod, 'ema_start', 2)
    monkeypatch.setattr(train_mod, 'ema_decay', 0.75)
    model, ema = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        torch.nn.init.constant_(model.weight, value)
        train_mod.update_ema(ema, model, step)
        # before ema_start the EMA is a copy
        if step == 1:
            assert torch.equal(ema.weight, model.weight)
    # then it averages: 2 -> 0.75 * 2 + 0.25 * 3 = 2.25 -> 0.75 * 2.25 + 0.25 * 4 = 2.6875
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 2.6875))


def test_sample_writes_png_grid(data, tmp_path):
    train(data, tmp_path, '--max_iters=2')
    p = run(
        [
            'sample.py',
            f'--out_dir={tmp_path}',
            '--steps=3',
            '--per_class=2',
            '--device=cpu',
            '--grade=True',
            '--grade_per_class=2',
        ]
    )
    img = np.asarray(Image.open(tmp_path / 'grid.png'))
    # 12 classes x 2, tiles >= 64 px
    assert img.ndim == 3 and img.shape[0] > 6 * 64 and img.shape[1] > 2 * 64
    assert 'conditional accuracy' in p.stdout
    from sample import load_model, sample_images

    model, diffusion, meta, _ = load_model(str(tmp_path / 'ckpt.pt'), torch.device('cpu'))
    labels = torch.arange(4)
    x1 = sample_images(model, diffusion, labels, meta, steps=3, cfg_scale=3.0, seed=5)
    x2 = sample_images(model, diffusion, labels, meta, steps=3, cfg_scale=3.0, seed=5)
    assert x1.shape == (4, 3, 32, 32) and x1.dtype == torch.uint8 and torch.equal(x1, x2)


def test_bench_prints_the_table(data):
    p = run(
        [
            'bench.py',
            'config/shapes.py',
            f'--data_dir={data}',
            '--unet_channels=8',
            '--batch_size=4',
            '--warmup=1',
            '--iters=2',
            '--sample_steps=2',
            '--sample_batch=2',
            '--device=cpu',
        ]
    )
    rows = dict(line.split('  ', 1) for line in p.stdout.splitlines() if '  ' in line)
    assert float(rows['train img/s'].strip()) > 0 and '%' in rows['data share of step']
    assert 'cpu' in rows['device'] and 'UNet' in rows['model']


def test_keep_best_early_stopping_and_loss_curve(data, tmp_path):
    # lr 0: the val loss never improves after the first evaluation, so patience 2 stops at the third
    p = train(
        data,
        tmp_path,
        '--lr=0.0',
        '--min_lr=0.0',
        '--max_iters=20',
        '--eval_interval=1',
        '--patience=2',
        '--wandb_project=nanodiffusion-test',
    )
    # optional: never required
    assert 'wandb is not installed' in p.stdout or importlib.util.find_spec('wandb')
    assert 'early stop: no better val loss in 2 evaluations' in p.stdout
    assert weights(tmp_path)['step'] == 3
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    assert best['step'] == 1 and best['stale'] == 0
    curve = Image.open(tmp_path / 'loss.png')
    assert curve.size == (640, 360)


def test_atomic_write_failure_leaves_the_old_file_byte_identical(tmp_path, monkeypatch):
    import checkpoint

    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save({'step': 1}, path)
    before = open(path, 'rb').read()

    def dies_mid_write(f):
        f.write(b'half a checkpoint')
        # anything: a kill, an exception in torch.save
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, dies_mid_write)
    # no partial file left
    assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['ckpt.pt']
    # the new bytes reach the disk (fsync) before the rename makes them the checkpoint
    events, replace = [], os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append('fsync'))
    monkeypatch.setattr(
        os, 'replace', lambda src, dst: (events.append(('replace', src != dst)), replace(src, dst))
    )
    checkpoint.save({'step': 2}, path)
    assert (
        events == ['fsync', ('replace', True)] and torch.load(path, weights_only=True)['step'] == 2
    )


def init_weights(ckpt):
    """The weights train.py starts from: the model built right after torch.manual_seed(seed)."""
    from model import build_model

    torch.manual_seed(1337)
    return build_model(ckpt['model_args']).state_dict()


def test_ema_follows_the_decay_formula_in_the_loop(data, tmp_path):
    """EMA after step 5 = 0.9 * EMA after step 4 + 0.1 * weights after step 5 (ema_start=3, decay
    0.9), and it is neither the raw weights nor the initial ones: the loop really updates it."""
    four, five = tmp_path / 'four', tmp_path / 'five'
    train(data, four, '--max_iters=4', '--eval_interval=0')
    train(data, five, '--max_iters=5', '--eval_interval=0')
    e4, c5 = weights(four)['ema'], weights(five)
    init = init_weights(c5)
    for name, e5 in c5['ema'].items():
        torch.testing.assert_close(
            e5, 0.9 * e4[name] + 0.1 * c5['model'][name], rtol=0, atol=1e-7, msg=name
        )
    moved = [n for n in init if not torch.equal(c5['ema'][n], init[n])]
    assert len(moved) > len(init) // 2 and any(
        not torch.equal(c5['ema'][n], c5['model'][n]) for n in moved
    )


def test_label_dropout_rate_and_use(data, tmp_path):
    """Label dropout happens at the configured rate, and the loop feeds the null class where it
    does: with class_dropout=1 the real classes' embeddings never get a gradient (Adam leaves them
    bit-identical, no weight decay on embeddings); with class_dropout=0 the null class's embedding
    never does."""
    from data import draw
    from diffusion import Diffusion

    drops = torch.cat(
        [
            draw(Diffusion(), s, 64, (3, 8, 8), torch.device('cpu'), 1, class_dropout=0.1).drop
            for s in range(200)
        ]
    )
    # 12,800 draws: 0.1 +- 3 standard errors
    assert abs(drops.float().mean().item() - 0.1) < 0.01
    for rate, frozen, trained in (
        ('1.0', slice(0, 12), slice(12, 13)),
        ('0.0', slice(12, 13), slice(0, 12)),
    ):
        out = tmp_path / rate
        train(data, out, '--max_iters=3', '--eval_interval=0', f'--class_dropout={rate}')
        ckpt = weights(out)
        y, y0 = ckpt['model']['y_embed.weight'], init_weights(ckpt)['y_embed.weight']
        assert (
            torch.equal(y[frozen], y0[frozen]) and (y[trained] != y0[trained]).all(dim=1).any()
        ), rate


def test_gradient_clipping_bounds_the_update(data, tmp_path):
    """Adam's first step moves each weight by ~lr * g / (|g| + 1e-8): about lr unclipped, but under
    1e-4 * lr once the gradient's norm is clipped to 1e-12. So a loop that ignores grad_clip moves
    the weights ~10,000x more."""
    moves = {}
    for clip in ('0.0', '1e-12'):
        out = tmp_path / clip
        train(
            data,
            out,
            '--max_iters=1',
            '--eval_interval=0',
            f'--grad_clip={clip}',
            '--weight_decay=0.0',
        )
        ckpt, init = weights(out), None
        init = init_weights(ckpt)
        moves[clip] = max((ckpt['model'][n] - init[n]).abs().max().item() for n in init)
    # warm-up: step 0 of warmup_iters=2 runs at lr / 3
    lr0 = 1e-3 / 3
    assert 0.5 * lr0 < moves['0.0'] <= 1.01 * lr0
    assert moves['1e-12'] < 1e-4 * lr0


def test_lr_schedule_by_value(monkeypatch):
    import train as train_mod

    for k, v in dict(
        lr=1e-3,
        min_lr=1e-4,
        warmup_iters=10,
        lr_decay_iters=110,
        max_iters=200,
        lr_schedule='cosine',
        restart_iters=40,
    ).items():
        monkeypatch.setattr(train_mod, k, v)
    get = train_mod.get_lr
    # linear warm-up
    assert get(0) == pytest.approx(1e-3 / 11) and get(9) == pytest.approx(1e-3 * 10 / 11)
    # the peak, then a half cosine down to min_lr at lr_decay_iters
    assert get(10) == pytest.approx(1e-3)
    assert get(35) == pytest.approx(1e-4 + 0.9e-3 * (1 + np.cos(np.pi / 4)) / 2)
    assert (
        get(60) == pytest.approx(5.5e-4)
        and get(110) == pytest.approx(1e-4)
        and get(150) == pytest.approx(1e-4)
    )
    # SGDR: back to the peak every restart_iters
    monkeypatch.setattr(train_mod, 'lr_schedule', 'restarts')
    assert (
        get(30) == pytest.approx(5.5e-4)
        and get(50) == pytest.approx(1e-3)
        and get(70) == pytest.approx(5.5e-4)
    )


def test_a_short_run_on_shapes_grades_well_above_chance(tmp_path):
    """End to end, ~18 s on one core: 200 steps of a 0.15M-parameter UNet on 16 px shapes, then
    sample.py --grade=True. Chance is 1/12 = 8%; this run reads ~50% (300 steps: 58.8%). A flipped
    training target or an EMA that never updates trains to the same loss but grades 0%, which is
    what this test is for."""
    d, out = tmp_path / 'data', tmp_path / 'out'
    run(['prepare.py', '--num_train=2000', '--num_val=64', '--resolution=16', f'--out_dir={d}'])
    run(
        [
            'train.py',
            f'--data_dir={d}',
            f'--out_dir={out}',
            '--arch=unet',
            '--device=cpu',
            '--compile=False',
            '--unet_channels=16',
            '--unet_mult=(1,2)',
            '--unet_blocks=1',
            '--n_head=2',
            '--batch_size=32',
            '--max_iters=200',
            '--lr=3e-3',
            '--min_lr=1e-4',
            '--beta2=0.95',
            '--warmup_iters=20',
            '--ema_start=100',
            '--ema_decay=0.95',
            '--eval_interval=0',
            '--eval_batches=1',
            '--sample_steps=2',
            '--log_interval=100',
        ]
    )
    p = run(
        [
            'sample.py',
            f'--out_dir={out}',
            '--grade=True',
            '--grade_per_class=20',
            '--steps=10',
            '--per_class=1',
            '--device=cpu',
        ]
    )
    acc = float(p.stdout.split('conditional accuracy')[1].split('%')[0].split()[-1])
    assert acc >= 30.0, p.stdout


def test_the_log_says_how_far_and_how_long(data, tmp_path):
    """Each log line: the step of the total and its share, the loss, LR, img/s and the time left at
    the rate since the last line; duration's format."""
    import re

    import evaluate

    p = train(data, tmp_path / 'o', '--max_iters=4', '--log_interval=2', '--eval_interval=0')
    lines = [line for line in p.stdout.splitlines() if re.match(r'step \d+/', line)]
    pattern = r'step (\d)/4 \((\d+)%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| \d+ img/s \| eta (\S+)$'
    got = [re.match(pattern, line).groups() for line in lines]
    assert [g[:2] for g in got] == [('2', '50'), ('4', '100')] and got[1][2] == '0s', lines
    assert [evaluate.duration(s) for s in (42.4, 303, 4320)] == ['42s', '5m03s', '1h12m']


def test_random_flip_mirrors_pixels_where_drawn(data):
    """random_flip draws a flip per example for pixel data (in the place of the latents' flip, so
    with it off the draws are as they were) and the batch holds exactly those images mirrored."""
    from data import Data, draw
    from diffusion import Diffusion

    d, cpu, shape = Diffusion(), torch.device('cpu'), (3, 16, 16)
    plain = draw(d, 3, 16, shape, cpu, 1)
    flipped = draw(d, 3, 16, shape, cpu, 1, flip_pixels=True)
    assert plain.flip is None and flipped.flip is not None and 0 < flipped.flip.sum() < 16
    assert torch.equal(plain.t, flipped.t) and torch.equal(plain.noise, flipped.noise)
    train_data = Data(data, 'train', cpu)
    idx = np.arange(16)
    x0 = train_data.batch(idx, plain).x0
    got = train_data.batch(idx, flipped).x0
    for i, f in enumerate(flipped.flip.tolist()):
        assert torch.equal(got[i], x0[i].flip(-1) if f else x0[i])


def test_a_terminal_gets_a_progress_bar_and_whole_log_lines(data, tmp_path):
    """Under a terminal (a pty) the run shows tqdm bars, of its steps and of its eval samples'
    network calls, and every log line still arrives whole; piped (every other test), none."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    args = TINY + [f'--data_dir={data}', f'--out_dir={tmp_path}', '--max_iters=4']
    args += ['--log_interval=2', '--eval_interval=4']
    env = {k: v for k, v in ENV.items() if k != 'TQDM_DISABLE'}
    leader, follower = pty.openpty()
    # a terminal 120 columns wide (a new pty has none: tqdm would draw a bar of width 0)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))
    p = subprocess.Popen(
        [sys.executable, 'train.py', *args], cwd=ROOT, env=env, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert p.wait() == 0
    text = b''.join(chunks).decode(errors='replace')
    lines = text.replace('\r', '\n').splitlines()
    assert any('step/s' in x or 's/step' in x for x in lines), text
    assert any(x.startswith('sampling:') for x in lines), text
    # each log line whole on its line (after whatever the bar left on the terminal's line)
    whole = r'step 2/4 \(50%\) \| loss [\d.]+ \| lr \S+ \| \d+ img/s \| eta \d+s$'
    assert any(re.search(whole, x) for x in lines), text
