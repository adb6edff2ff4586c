"""The shapes quality yardsticks: factors read back against the true ones, the factor FD (real vs
real is small, a collapsed sampler at the same accuracy is clearly worse), sample.py --save_dir /
--grade, and train.py grading its eval samples and keeping best.pt by them. CPU, seeded, seconds."""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample
import shapes
import train
from conftest import one_error_line, python
from test_train import ENV, TINY


def run(args, check=True):
    p = python(args, ROOT, ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout}\n{p.stderr}")
    return p


def images_of(n, seed, res=32):
    x, y = map(np.stack, zip(*shapes.shape_images(n, res, seed)))
    return x, y


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'shapes')
    # 8 val images per class
    run(['prepare.py', '--num_train=192', '--num_val=96', f'--out_dir={d}'])
    return d


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """A 2-step model; its evaluation is graded (its samples are noise: unreadable, so the FD is
    undefined)."""
    out = tmp_path_factory.mktemp('out')
    p = run(
        [
            'train.py',
            f'--data_dir={data}',
            f'--out_dir={out}',
            '--max_iters=2',
            '--eval_grade_per_class=2',
        ]
        + TINY
    )
    (out / 'train.log').write_text(p.stdout)
    return out


# ---------------------------------------------------------------- shapes.py: the metric itself


@pytest.mark.parametrize('res', [32, 64])
def test_read_factors_recovers_the_true_factors(res):
    """Every image read back within 1.5 px of its true box side, 1 px of its centre and 1% of its
    background grey (measured worst cases at 32 px: 1.4 px, 0.74 px, 0.4%); and no bias: the means
    agree within 0.25 px, 0.3%."""
    errors, n = [], 240 if res == 32 else 96
    for (y, (x0, y0, x1, y1), bg), (img, label) in zip(
        shapes.shape_draws(n, res, 3), shapes.shape_images(n, res, 3)
    ):
        f = shapes.read_factors(img)
        assert label == y and (f['shape'], f['colour']) == shapes.read_shape(img)
        assert shapes.read_shape(img) == (shapes.SHAPES[y // 4], shapes.COLOURS[y % 4])
        true = dict(
            size=(x1 - x0) / res,
            x=(x0 + x1) / 2 / res,
            y=(y0 + y1) / 2 / res,
            background=np.mean(bg) / 255,
        )
        errors.append([(f[k] - true[k]) for k in shapes.FACTORS])
    # px, px, px, grey fraction
    e = np.array(errors) * [res, res, res, 1]
    assert np.abs(e).max(0).tolist() < [1.5, 1.0, 1.0, 0.01], np.abs(e).max(0)
    assert (np.abs(e.mean(0)) < [0.25, 0.25, 0.25, 0.003]).all(), e.mean(0)
    # nothing there: unreadable
    assert shapes.read_factors(np.full((3, res, res), 128, np.uint8)) is None
    assert np.isnan(
        shapes.factor_matrix(np.random.default_rng(0).integers(0, 256, (4, 3, res, res), np.uint8))
    ).all()


def test_factor_fd_small_for_real_data_and_clearly_worse_for_collapse():
    """Real vs another real split (480 samples) is small; three collapsed samplers with the same
    100% accuracy are each clearly worse, and per class points at the collapsed class."""
    ref, ref_y = images_of(960, (1337, 1))
    # read once, reused (factor_fd takes images or their factor matrix)
    ref_f = shapes.factor_matrix(ref)
    real, y = images_of(480, 7)
    real_f = shapes.factor_matrix(real)
    fd_real = shapes.factor_fd(real, y, ref_f, ref_y)
    assert (
        fd_real['overall'] < 0.015
        and sum(fd_real['n'].values()) == 480
        and sum(fd_real['n_ref'].values()) == 960
    )
    assert set(fd_real['per_class']) == set(range(12)) and max(fd_real['per_class'].values()) < 0.03
    # images or their factors: the same
    assert shapes.factor_fd(real_f, y, ref_f, ref_y) == fd_real
    # 1. every sample of a class the same image (a fixed noise per class): copies of real images, so
    # 100% read right
    first = np.array([np.argmax(y == c) for c in range(12)])[y]
    # 2. every shape the same size, in the same place (the mean's), background as drawn
    same = np.stack(
        [
            shapes.draw_shape(
                shapes.SHAPES[c // 4], shapes.COLOURS[c % 4], (9.6, 9.6, 22.4, 22.4), bg, 32
            ).transpose(2, 0, 1)
            for c, _, bg in shapes.shape_draws(480, 32, 7)
        ]
    )
    # equal accuracy: it cannot tell them apart
    assert shapes.grade(same, y)[0] == shapes.grade(real, y)[0] == 1.0
    # 3. only the red circles collapsed
    one = np.where((y == 0)[:, None], real_f[first], real_f)
    fd = {
        name: shapes.factor_fd(x, y, ref_f, ref_y)
        for name, x in (('repeated', real_f[first]), ('same', same), ('one', one))
    }
    assert (
        fd['repeated']['overall'] > 10 * fd_real['overall']
        and fd['same']['overall'] > 5 * fd_real['overall']
    )
    assert fd['one']['overall'] > 1.5 * fd_real['overall']
    # the culprit
    assert fd['one']['per_class'][0] > 5 * max(v for c, v in fd['one']['per_class'].items() if c)
    # fewer than 2 readable samples in a class: that class, and so the overall mean, is undefined
    noise = np.random.default_rng(0).integers(0, 256, (12, 3, 32, 32), np.uint8)
    x, labels = np.concatenate([real[y != 5], noise]), np.concatenate([y[y != 5], np.full(12, 5)])
    partial = shapes.factor_fd(x, labels, ref_f, ref_y)
    assert (
        np.isnan(partial['overall']) and np.isnan(partial['per_class'][5]) and partial['n'][5] == 0
    )


# ---------------------------------------------------------------- sample.py


def test_save_dir_writes_n_labelled_pngs_reproducibly(trained, tmp_path):
    cmd = [
        'sample.py',
        f'--out_dir={trained}',
        '--steps=2',
        '--num_samples=30',
        '--batch_size=8',
        '--device=cpu',
        '--seed=3',
    ]
    p = run(cmd + [f'--save_dir={tmp_path / "a"}'])
    # the images instead of the grid
    assert 'wrote 30 images' in p.stdout and 'grid.png' not in p.stdout
    run(cmd + [f'--save_dir={tmp_path / "b"}'])
    doc = json.loads((tmp_path / 'a' / 'samples.json').read_text())
    assert doc['files'] == [f"{i:06d}.png" for i in range(30)]
    assert sorted(os.listdir(tmp_path / 'a')) == doc['files'] + ['samples.json']
    assert doc['labels'] == [i % 12 for i in range(30)] and doc['classes'][13] == 'green circle'
    assert doc['prompts'] == [''] * 30 and doc['seed'] == 3 and '2 steps' in doc['sampler']
    assert doc['checkpoint'] == os.path.join(str(trained), 'ckpt.pt')
    for name in doc['files'] + ['samples.json']:
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes(), name
    for name in doc['files']:
        img = np.asarray(Image.open(tmp_path / 'a' / name))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8, name
    # the first 8 are one batch from the same seed: a longer run starts with the same images
    run(
        cmd[:3]
        + [
            '--num_samples=9',
            '--batch_size=8',
            '--device=cpu',
            '--seed=3',
            f'--save_dir={tmp_path / "c"}',
        ]
    )
    assert (tmp_path / 'c' / '000007.png').read_bytes() == (
        tmp_path / 'a' / '000007.png'
    ).read_bytes()


FAKE_SAMPLER = """
import os, numpy as np, torch, images, sample, shapes
pool = {{}}
for img, y in shapes.shape_images(240, 32, 5):  # 20 real images per class
    pool.setdefault(y, []).append(img)
def sample_images(model, diffusion, labels, meta, cfg_scale, seed=0, **kw):
    # a stand-in for the model: real images; 'collapsed' = one image per class. The count of calls
    # is kept in a file, so a resumed run continues the sequence: call n is collapsed unless n in
    # {good}
    path = os.path.join({out!r}, 'calls')
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, 'w').write(str(n))
    pick = lambda i, y: pool[y][i % 20 if n in {good} else 0]
    return torch.from_numpy(np.stack([pick(i, y) for i, y in enumerate(labels.tolist())]))
sample.sample_images = images.sample_images = sample_images
"""


def run_patched(module, patch, args):
    """module.main() in a fresh process, with sys.argv = args and `patch` (Python source) applied
    first."""
    # sample.main() reads argv
    configure = f"{module}.configure({module}.__dict__)\n" if module == 'train' else ''
    code = (
        f"import sys\nsys.argv = {[module + '.py'] + args!r}\n{textwrap.dedent(patch)}\n"
        f"import {module}\n{configure}{module}.main()\n"
    )
    return python(['-c', code], ROOT, ENV)


def test_grade_prints_accuracy_and_factor_fd(trained, data, tmp_path):
    """With a stand-in sampler that returns real images, the FD is a number, small, and shown per
    class too (an untrained model's samples are noise: tests/test_train.py grades one)."""
    p = run_patched(
        'sample',
        FAKE_SAMPLER.format(out=str(tmp_path), good={1, 2}),
        [f'--out_dir={trained}', '--grade=True', '--grade_per_class=8', '--device=cpu'],
    )
    assert p.returncode == 0, p.stderr
    line = next(l for l in p.stdout.splitlines() if l.startswith('factor FD'))
    assert (
        0 < float(line.split('): ')[1].split()[0]) < 0.1
        and '96 of 96 samples readable, 96 real' in line
    ), line
    assert (
        'conditional accuracy (class labels; shape and colour read back right): 100.0% of 96'
        in p.stdout
    )
    assert 'per class (accuracy, factor FD): red circle 100% 0.' in p.stdout
    one_error_line(
        run(
            ['sample.py', f'--out_dir={trained}', '--grade=True', '--data_dir=/no/such/dir'],
            check=False,
        ),
        '/no/such/dir',
        'prepare.py',
    )


# ---------------------------------------------------------------- train.py


def test_train_logs_the_grade_and_keeps_best_by_it_and_resumes_exactly(trained, data, tmp_path):
    """Real samples graded in the eval line; then a stand-in sampler that is collapsed at every
    evaluation but the 2nd: best.pt by factor FD is step 2's (by val loss it would be another), also
    across a resume at step 2, and the resumed run ends bit-identical, best.pt included."""
    log = (trained / 'train.log').read_text()
    assert (
        'step 2 | val loss (ema) ' in log
        and '| shapes accuracy 0.0%, factor FD nan (24 samples)' in log
    )
    args = TINY + [
        '--max_iters=4',
        '--eval_interval=1',
        '--eval_grade_per_class=8',
        '--keep_best=shapes_fd',
    ]
    a, b = tmp_path / 'a', tmp_path / 'b'
    p = run_patched(
        'train',
        FAKE_SAMPLER.format(out=str(a), good={2}),
        [f'--data_dir={data}', f'--out_dir={a}'] + args,
    )
    assert p.returncode == 0, p.stderr
    evals = [l for l in p.stdout.splitlines() if 'shapes accuracy' in l]
    assert len(evals) == 4 and all('shapes accuracy 100.0%' in l for l in evals)
    assert [('FD' in l and '(best)' in l) for l in evals] == [True, True, False, False], evals
    fds = [float(l.split('factor FD ')[1].split()[0]) for l in evals]
    assert fds[1] < fds[0] / 3 and min(fds[2:]) > fds[1]
    # val loss: another step
    assert np.argmin([float(l.split('val loss (ema) ')[1].split()[0]) for l in evals]) != 1
    best_a = torch.load(a / 'best.pt', weights_only=True)
    assert best_a['step'] == 2 and best_a['best_score'] == pytest.approx(fds[1], abs=1e-4)
    common = [f'--data_dir={data}', f'--out_dir={b}'] + args
    patch = FAKE_SAMPLER.format(out=str(b), good={2})
    # stops after eval 2
    assert run_patched('train', patch, common + ['--max_iters=2']).returncode == 0
    p = run_patched('train', patch, common + ['--init_from=resume'])
    assert p.returncode == 0 and 'at step 2' in p.stdout, p.stderr
    for name in ('ckpt.pt', 'best.pt'):
        x, y = (torch.load(d / name, weights_only=True) for d in (a, b))
        assert (
            x['step'] == y['step']
            and x['best_score'] == y['best_score']
            and x['stale'] == y['stale']
        ), name
        for key in ('model', 'ema'):
            assert all(torch.equal(x[key][k], y[key][k]) for k in x[key]), (name, key)


@pytest.mark.parametrize(
    'module, key, value',
    [
        (train, 'eval_grade_per_class', -1),
        (train, 'eval_grade_per_class', 1),
        (train, 'keep_best', 'fid'),
        (train, 'keep_best', 'shapes_fd'),
        (sample, 'num_samples', -5),
        (sample, 'num_samples', 10),
        (sample, 'save_dir', 'x'),
    ],
)
def test_harmful_quality_settings_are_refused(monkeypatch, module, key, value):
    # keep_best by samples without grading; a count without a folder, ...
    monkeypatch.setattr(module, key, value)
    with pytest.raises(SystemExit) as e:
        module.check_config()
    assert str(e.value).startswith('error:') and f'--{key}=' in str(e.value)


@pytest.mark.parametrize(
    'key, value', [('sampler', 'heun'), ('sampler', 'ddpm'), ('eta', 0.5), ('spacing', 'logsnr')]
)
def test_tune_refuses_what_it_cannot_fit(monkeypatch, key, value):
    """A solver matrix is one call a step and deterministic, on the grid 'auto' would pick: else one
    line."""
    monkeypatch.setattr(sample, 'tune', True)
    monkeypatch.setattr(sample, 'sampler', 'ddim' if key == 'eta' else sample.sampler)
    monkeypatch.setattr(sample, key, value)
    with pytest.raises(SystemExit) as e:
        sample.check_config()
    assert str(e.value).startswith('error: --tune=True') and '\n' not in str(e.value)


def test_tune_writes_a_solver_that_later_runs_use(trained, tmp_path):
    """--tune=True fits the solver to the checkpoint on one noise batch, checks it on another, and
    stores it beside it with both errors and the digest of the weights; a later run with the same
    sampler, steps and cfg samples with it (spacing 'auto') if it won on the checked noise, another
    step count does not; a bad file is one line."""
    import shutil

    out = tmp_path / 'o'
    shutil.copytree(trained, out)
    args = ['sample.py', f'--out_dir={out}', '--steps=3', '--per_class=1', '--device=cpu']
    p = run(args + ['--tune=True', '--tune_batch=4', '--tune_iters=5'])
    ((key, g),) = json.loads((out / 'grids.json').read_text()).items()
    assert key.endswith(' 3 steps cfg 4') and len(g['t']) == 3 and g['batch'] == 4
    assert g['iters'] == 5 and len(g['weights']) == 16 and g['checkpoint'] == 'ckpt.pt'
    assert g['val_error'] <= g['val_start_error'] and g['used'] == (g['matrix'] is not None)
    assert f"tuned {key}" in p.stdout and 'held-out noise' in p.stdout
    if g['used']:
        assert len(g['matrix']) == 3 and all(len(row) == 4 for row in g['matrix'])
    used = 'tuned solver, 3 steps' in run(args).stdout
    assert used == g['used'] == ('tuned solver, 3 steps' in p.stdout)
    assert 'tuned' not in run(args[:2] + ['--steps=4'] + args[3:]).stdout
    (out / 'grids.json').write_text(
        '{"unipc3 3 steps cfg 4": {"t": [1, 0.6, 0.3], "matrix": [[1, 0]]}}'
    )
    one_error_line(run(args, check=False), 'grids.json', '--tune=True')


def test_a_fit_is_used_for_its_own_weights_only(trained, tmp_path):
    """A fit in grids.json names the weights it was fitted to: the same ckpt.pt uses it; the same
    file trained further, best.pt with other weights, or a fit that lost on its held-out noise gets
    the untuned solver and one line saying why and how to refit."""
    import shutil

    from checkpoint import load_model
    from fitted import weights_digest
    from samplers import solver_matrix

    out = tmp_path / 'o'
    shutil.copytree(trained, out)
    model, diffusion, _, _ = load_model(str(out / 'ckpt.pt'), torch.device('cpu'))
    key = 'unipc3 3 steps cfg 4'
    t, _, _ = diffusion.sampling_schedule(3, 'flowtime')
    # a fit that is the untuned solver's own matrix: the same samples either way
    fit = dict(t=t.tolist(), matrix=solver_matrix(diffusion, 3).tolist(), used=True)
    fit['weights'] = weights_digest(model)
    (out / 'grids.json').write_text(json.dumps({key: fit}))
    args = ['sample.py', f'--out_dir={out}', '--steps=3', '--per_class=1', '--device=cpu']
    p = run(args)
    assert 'tuned solver, 3 steps' in p.stdout and 'other weights' not in p.stdout
    # best.pt, with other weights; then ckpt.pt itself, trained further
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    name = next(iter(ckpt['ema']))
    ckpt['ema'][name] = ckpt['ema'][name] + 1e-3
    torch.save(ckpt, out / 'best.pt')
    for extra in (['--ckpt_name=best.pt'], []):
        if not extra:
            shutil.copy(out / 'best.pt', out / 'ckpt.pt')
        p = run(args + extra)
        assert 'tuned solver, 3 steps' not in p.stdout and 'unipc3 flowtime, 3 steps' in p.stdout
        assert f"grids.json's {key} fit is for other weights" in p.stdout
        assert 'refit with --tune=True' in p.stdout
    # a fit that did not win on its held-out noise is recorded, not used
    fit.update(
        matrix=None,
        used=False,
        weights=weights_digest(load_model(str(out / 'ckpt.pt'), torch.device('cpu'))[0]),
    )
    (out / 'grids.json').write_text(json.dumps({key: fit}))
    p = run(args)
    assert 'did not beat the untuned solver' in p.stdout and 'tuned solver, 3' not in p.stdout


def test_classes_pick_what_is_drawn_and_graded(trained, tmp_path):
    """--classes (names or indices) picks the grid's rows, the save_dir folder's classes and the
    grader's; a name the model does not have is one line."""
    from shapes import CLASS_NAMES

    pick = f'--classes={CLASS_NAMES[5]},2'
    args = ['sample.py', f'--out_dir={trained}', '--steps=2', '--device=cpu', pick]
    p = run(args + ['--per_class=3'])
    assert '(6 images,' in p.stdout
    folder = tmp_path / 's'
    run(args + [f'--save_dir={folder}', '--num_samples=4'])
    index = json.loads((folder / 'samples.json').read_text())
    assert index['labels'] == [5, 2, 5, 2]
    p = run(args + ['--grade=True', '--grade_per_class=2'])
    per = p.stdout.split('per class (accuracy, factor FD): ')[1]
    assert per.startswith(CLASS_NAMES[5] + ' ') and CLASS_NAMES[2] in per
    assert 'of 4 samples' in p.stdout and CLASS_NAMES[0] + ' ' not in per
    one_error_line(run(args[:-1] + ['--classes=purple moon'], check=False), 'purple moon', '0..11')
