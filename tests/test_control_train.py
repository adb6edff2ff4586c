"""A control branch trained end to end (train.py --init_from=<base checkpoint>, sample.py --hint):
on a tiny shapes set with mask hints, a tiny base, then the branch fine-tuned on it in the same
loop: the base stays bit-identical, hint dropout is the (seed, step) draw, the run resumes exactly,
and it samples with hints in the grid's first row."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare
import train as train_mod
from checkpoint import load_model
from configurator import configure
from conftest import one_error_line, one_line_exit
from data import Data, draw
from diffusion import Diffusion
from sample import sample_images
from test_train import TINY, assert_same_run, run, run_with, train, weights

pytestmark = pytest.mark.usefixtures('one_thread')
CPU = torch.device('cpu')
# the control runs: 4 steps, evaluated at 2 and 4
RUN = ['--max_iters=4', '--eval_interval=2', '--hint_dropout=0.5']
# the hint each training step's loss was given, per example: all zero (dropped) or not (train.py as
# it runs)
RECORD_EMPTY_HINTS = """
import diffusion, torch
real = diffusion.Diffusion.loss
# train.py's objective calls loss(model, x0, y, t, noise, min_snr_gamma, text, hint)
def loss(self, *args, **kw):
    if torch.is_grad_enabled():  # a training step
        print('EMPTY', (args[7].flatten(1).amax(1) == 0).int().tolist())
    else:  # val_loss: the val hints, none dropped
        print('VAL', args[7].shape[0], int((args[7].flatten(1).amax(1) == 0).sum()))
    return real(self, *args, **kw)
diffusion.Diffusion.loss = loss
"""


def prepared(out, *args):
    prepare.main(
        configure(
            dict(vars(prepare)),
            ['--num_train=48', '--num_val=8', '--resolution=16', f'--out_dir={out}', *args],
        )
    )
    return str(out)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp('data') / 'mask', '--hint=mask')


@pytest.fixture(scope='module')
def base(data, tmp_path_factory):
    """A 3-step base model, trained from scratch on the hinted set (a run without a branch ignores
    the hints). Another seed than the control runs': their branch's copies are built from other
    random weights than the base's."""
    out = tmp_path_factory.mktemp('base')
    train(data, out, '--max_iters=3', '--eval_interval=0', '--seed=7')
    return out


@pytest.fixture(scope='module')
def tuned(data, base, tmp_path_factory):
    """The branch fine-tuned on the base for 4 steps, the hints each training step got recorded
    (empty or not)."""
    out = tmp_path_factory.mktemp('tuned')
    p = run_with(
        RECORD_EMPTY_HINTS,
        [f'--data_dir={data}', f'--out_dir={out}', f'--init_from={base}/ckpt.pt'] + TINY + RUN,
    )
    assert p.returncode == 0, p.stderr
    # evaluated at 2 and 4
    assert [line for line in p.stdout.splitlines() if line.startswith('VAL')] == ['VAL 8 0'] * 2
    return out, [eval(line[6:]) for line in p.stdout.splitlines() if line.startswith('EMPTY ')]


def test_only_the_branch_trains_and_it_resumes_exactly(data, base, tuned, tmp_path):
    out, _ = tuned
    ckpt, want = weights(out), weights(base)['ema']
    assert ckpt['model_args']['hint_channels'] == 1 and ckpt['model_args']['hint_size'] == 16
    # the base, frozen: bit-identical to the base checkpoint's EMA weights
    for key in ('model', 'ema'):
        assert {k for k in ckpt[key] if not k.startswith('control.')} == set(want)
        for k, v in want.items():
            assert torch.equal(ckpt[key][k], v), (key, k)
    branch = {k: v for k, v in ckpt['model'].items() if k.startswith('control.')}
    zero = [k for k in branch if k.startswith('control.zero.') and k.endswith('weight')]
    # the zero links learnt
    assert zero and all(branch[k].abs().sum() > 0 for k in zero)
    # the copies of the base's first blocks started as them (Adam moved each weight by <= ~lr a step
    # since) and moved
    moved = [
        (branch[k] - want[k.removeprefix('control.')]).abs().max()
        for k in branch
        if k.startswith('control.blocks.')
    ]
    assert moved and max(moved) < 4 * 1e-3 * 1.1 and max(moved) > 0
    # the optimizer holds the branch's parameters only
    assert len(ckpt['optimizer']['state']) == len(branch)
    # the eval grid: the base's 12 classes x 8, and the control run's first row of val hints above
    # them
    rows = [
        (np.asarray(Image.open(path)).shape[0] - 2) / n
        for path, n in ((base / 'samples_000003.png', 12), (out / 'samples_000004.png', 13))
    ]
    assert rows[0] == rows[1] == int(rows[0])
    # 2 steps, then resumed for 2 more (the resumed run has no base path: it is in the checkpoint)
    half = tmp_path / 'half'
    train(data, half, f'--init_from={base}/ckpt.pt', *RUN[1:], '--max_iters=2')
    p = train(data, half, '--init_from=resume', *RUN)
    assert 'resuming from' in p.stdout and 'at step 2' in p.stdout
    assert_same_run(ckpt, weights(half))


def test_hint_dropout_is_the_seeded_draw(tuned):
    """data.draw's hint dropout is drawn after its other draws (those are as they were), and the
    loop gives exactly the examples it picks an all-zero hint (the shapes masks are never empty)."""
    _, seen = tuned
    d = Diffusion()
    for latent in (False, True):
        got = draw(d, 7, 64, (3, 8, 8), CPU, 5, latent, train_mod.class_dropout, 0.5)
        # the draws as they were before hint dropout
        g = torch.Generator().manual_seed(5 * 1_000_003 + 7)
        before = [
            d.sample_t(64, g),
            torch.randn(64, 3, 8, 8, generator=g),
            torch.rand(64, generator=g) < train_mod.class_dropout,
        ]
        before += (
            [torch.randn(64, 3, 8, 8, generator=g), torch.rand(64, generator=g) < 0.5]
            if latent
            else [None, None]
        )
        for a, b in zip((got.t, got.noise, got.drop, got.eps, got.flip), before):
            assert (a is None and b is None) or torch.equal(a, b)
    empty = torch.cat(
        [draw(d, s, 64, (3, 8, 8), CPU, 1, hint_dropout=0.5).empty for s in range(100)]
    )
    # 6,400 draws: 0.5 +- 5 standard errors
    assert abs(empty.float().mean() - 0.5) < 0.03
    want = [
        draw(d, s, 8, (3, 16, 16), CPU, 1337, hint_dropout=0.5).empty.int().tolist()
        for s in range(4)
    ]
    assert seen == want and 0 < sum(map(sum, seen)) < 32


def test_samples_with_hints(data, base, tuned, tmp_path):
    out, _ = tuned
    model, diffusion, meta, _ = load_model(str(out / 'ckpt.pt'), CPU)
    plain, _, _, _ = load_model(str(base / 'ckpt.pt'), CPU)
    hints = Data(data, 'val', CPU).get_hint(np.arange(8))
    x, t, y = torch.randn(4, 3, 16, 16), torch.full((4,), 500.0), torch.arange(4)
    with torch.no_grad():
        # the trained branch acts
        assert not torch.allclose(model(x, t, y, hint=hints[:4]), model(x, t, y))
    # 4 steps moved the branch too little to change a uint8 sample: the same checkpoint, the branch
    # perturbed
    loud = tmp_path / 'loud'
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt['ema'].items():
        if k.startswith('control.'):
            v.add_(0.05 * torch.randn(v.shape, generator=g))
    loud.mkdir()
    torch.save(ckpt, loud / 'ckpt.pt')
    model, _, _, _ = load_model(str(loud / 'ckpt.pt'), CPU)
    # no hint, or strength 0: exactly the base model; a hint (CFG's two halves both see it): its own
    # samples
    kw = dict(steps=2, cfg_scale=3.0, seed=5)
    want = sample_images(plain, diffusion, y, meta, **kw)
    assert torch.equal(sample_images(model, diffusion, y, meta, **kw), want)
    assert torch.equal(
        sample_images(model, diffusion, y, meta, hint=hints[:4], control_scale=0.0, **kw), want
    )
    one, two = (
        sample_images(model, diffusion, y, meta, hint=h, **kw) for h in (hints[:4], hints[4:])
    )
    assert all(not torch.equal(a, b) for a, b in zip(one, want)) and all(
        not torch.equal(a, b) for a, b in zip(one, two)
    )
    # sample.py: a hint image for every sample, then the val hints one per column, each in the
    # grid's first row
    png = tmp_path / 'hint.png'
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 3:9] = 255
    Image.fromarray(mask).save(png)
    val = (hints[:3, 0] * 255).round().byte().numpy()
    for arg, per_class, first_row in ((str(png), 2, [mask, None]), ('val', 3, list(val))):
        p = run(
            [
                'sample.py',
                f'--out_dir={loud}',
                f'--hint={arg}',
                f'--per_class={per_class}',
                '--steps=2',
                '--device=cpu',
            ]
        )
        assert 'hints in the first row' in p.stdout
        grid = np.asarray(Image.open(loud / 'grid.png'))
        # 12 classes and the hints' row, tiles of 16 px shown at 64
        row = (grid.shape[0] - 2) / 13
        assert grid.shape[1] == 2 + per_class * 66 and row == int(row), grid.shape
        # below the captions
        top = int(row) - 66 + 2
        for j, want in enumerate(first_row):
            tile = grid[top : top + 64, 2 + 66 * j : 2 + 66 * j + 64]
            # one hint: the rest of the row blank
            want = np.full((16, 16), 255, np.uint8) if want is None else want
            assert np.array_equal(
                tile, np.repeat(np.repeat(want, 4, 0), 4, 1)[..., None].repeat(3, -1)
            ), (arg, j)
    # --save_dir: the val hints in turn (8 of them, so image 8 has hint 0), batch k seeded with k
    run(
        [
            'sample.py',
            f'--out_dir={loud}',
            '--hint=val',
            f'--save_dir={tmp_path / "s"}',
            '--num_samples=10',
            '--batch_size=4',
            '--steps=2',
            '--device=cpu',
        ]
    )
    for k in range(3):
        i = np.arange(4 * k, min(4 * k + 4, 10))
        want = sample_images(
            model, diffusion, torch.from_numpy(i), meta, 4.0, seed=k, steps=2, hint=hints[i % 8]
        )
        for img, j in zip(want, i):
            assert np.array_equal(
                np.asarray(Image.open(tmp_path / 's' / f'{j:06d}.png')),
                img.permute(1, 2, 0).numpy(),
            ), j
    one_error_line(
        run(['sample.py', f'--out_dir={base}', '--hint=val', '--device=cpu'], check=False),
        'no control branch',
        '--hint',
    )


def control_run(monkeypatch, data, out, init_from, **settings):
    """train.main in this process (it stops before training: each case here is refused)."""
    for k, v in dict(
        data_dir=data,
        out_dir=str(out),
        init_from=init_from,
        device='cpu',
        compile=False,
        n_layer=2,
        n_head=2,
        n_embd=32,
        patch_size=4,
        batch_size=8,
        max_iters=1,
        **settings,
    ).items():
        monkeypatch.setattr(train_mod, k, v)
    return lambda: train_mod.main()


def test_bad_bases_are_one_line(data, base, tmp_path, monkeypatch):
    base_ckpt = str(base / 'ckpt.pt')
    # no hints
    plain = prepared(tmp_path / 'plain')
    one_line_exit(
        control_run(monkeypatch, plain, tmp_path / 'a', base_ckpt), 'needs hints', plain, '--hint='
    )
    ckpt = torch.load(base_ckpt, weights_only=True)
    del ckpt['ema']['head.weight']
    ckpt['ema']['extra'] = torch.zeros(1)
    torch.save(ckpt, tmp_path / 'bad.pt')
    one_line_exit(
        control_run(monkeypatch, data, tmp_path / 'b', str(tmp_path / 'bad.pt')),
        str(tmp_path / 'bad.pt'),
        'do not fit',
        'head.weight',
        'extra',
    )
    one_line_exit(
        control_run(monkeypatch, data, tmp_path / 'c', base_ckpt, objective='vp'),
        base_ckpt,
        'objective=flow in checkpoint vs vp now',
    )
    monkeypatch.setattr(train_mod, 'init_from', str(tmp_path / 'nope.pt'))
    one_line_exit(train_mod.check_config, '--init_from=', 'nope.pt')
