"""train.py and sample.py end to end on a tiny model and a tiny shapes set (CPU, seconds each)."""
import importlib
import importlib.util
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', TQDM_DISABLE='1')
TINY = ['--patch_size=4', '--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=8', '--lr=1e-3',
        '--warmup_iters=2', '--lr_decay_iters=40', '--ema_start=3', '--ema_decay=0.9', '--eval_batches=1',
        '--log_interval=1', '--sample_steps=2', '--compile=False', '--device=cpu']


def run(args, check=True, **kw):
    p = subprocess.run([sys.executable] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'shapes')
    run(['prepare.py', '--num_train=192', '--num_val=16', f'--out_dir={d}'])
    return d


def train(data, out, *extra, check=True):
    return run(['train.py', f'--data_dir={data}', f'--out_dir={out}'] + TINY + list(extra), check=check)


def weights(out):
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    return ckpt


def assert_same_run(a, b, atol=0.0):
    for key in ('model', 'ema'):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=atol, msg=f"{key}.{name}")
    assert a['step'] == b['step']


@pytest.mark.parametrize('arch', ['--arch=dit', '--arch=unet'])
def test_loss_goes_down(data, tmp_path, arch):
    p = train(data, tmp_path, arch, '--unet_channels=16', '--lr=3e-3', '--max_iters=60', '--eval_interval=0')
    losses = [float(l.split('loss ')[1].split()[0]) for l in p.stdout.splitlines() if l.startswith('step') and '| lr' in l]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10])
    assert os.path.exists(tmp_path / 'samples_000060.png')


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(data, tmp_path):
    """Killed with SIGKILL 4 times at random moments (a checkpoint is written every step, so some kills land
    mid-write), resumed each time: no checkpoint is ever unreadable and the end result is bit-identical."""
    import random
    import time
    a, b = tmp_path / 'a', tmp_path / 'b'
    args = ['--max_iters=30', '--eval_interval=1']
    train(data, a, *args)
    rng, kills = random.Random(0), 0
    while kills < 4:
        resume = ['--init_from=resume'] if (b / 'ckpt.pt').exists() else []
        proc = subprocess.Popen([sys.executable, 'train.py', f'--data_dir={data}', f'--out_dir={b}'] + TINY + args + resume,
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.5, 5.0))
        proc.send_signal(signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:
            break  # it finished first: nothing left to interrupt
        kills += 1
        if (b / 'ckpt.pt').exists():
            assert torch.load(b / 'ckpt.pt', weights_only=False)['step'] >= 1  # never a torn file
    assert kills >= 2, "the run finished before it could be interrupted: make it longer"
    p = train(data, b, *args, '--init_from=resume')
    resumed_at = int(p.stdout.split('at step ')[1].split()[0])
    assert 1 <= resumed_at < 30
    assert_same_run(weights(a), weights(b))


def test_resume_refuses_a_different_model(data, tmp_path):
    train(data, tmp_path, '--max_iters=1')
    p = train(data, tmp_path, '--max_iters=2', '--init_from=resume', '--n_layer=3', check=False)
    assert p.returncode != 0
    assert 'n_layer=2 in checkpoint vs 3 now' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.parametrize('per_process', [['--batch_size=4'], ['--batch_size=2', '--gradient_accumulation_steps=2']])
def test_two_process_ddp_equals_one_process(data, tmp_path, per_process):
    one, two = tmp_path / 'one', tmp_path / 'two'
    train(data, one, '--max_iters=4', '--eval_interval=0', '--batch_size=8')
    run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', f'--data_dir={data}',
         f'--out_dir={two}', '--max_iters=4', '--eval_interval=0'] + TINY + per_process, timeout=300)
    # the same examples, noise and labels; only the order of the float sums differs
    assert_same_run(weights(one), weights(two), atol=1e-5)


def test_gradient_accumulation_equals_big_batch(data, tmp_path):
    big, acc = tmp_path / 'big', tmp_path / 'acc'
    train(data, big, '--max_iters=4', '--eval_interval=0', '--batch_size=8')
    train(data, acc, '--max_iters=4', '--eval_interval=0', '--batch_size=4', '--gradient_accumulation_steps=2')
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
        if step == 1:  # before ema_start the EMA is a copy
            assert torch.equal(ema.weight, model.weight)
    # then it averages: 2 -> 0.75 * 2 + 0.25 * 3 = 2.25 -> 0.75 * 2.25 + 0.25 * 4 = 2.6875
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 2.6875))


def test_sample_writes_png_grid(data, tmp_path):
    train(data, tmp_path, '--max_iters=2')
    p = run(['sample.py', f'--out_dir={tmp_path}', '--steps=3', '--per_class=2', '--device=cpu', '--grade=True',
             '--grade_per_class=2'])
    img = np.asarray(Image.open(tmp_path / 'grid.png'))
    assert img.ndim == 3 and img.shape[0] > 6 * 64 and img.shape[1] > 2 * 64  # 12 classes x 2, tiles >= 64 px
    assert 'conditional accuracy' in p.stdout
    from sample import load_model, sample_images
    model, diffusion, meta, _ = load_model(str(tmp_path / 'ckpt.pt'), torch.device('cpu'))
    labels = torch.arange(4)
    x1 = sample_images(model, diffusion, labels, meta, steps=3, cfg_scale=3.0, seed=5)
    x2 = sample_images(model, diffusion, labels, meta, steps=3, cfg_scale=3.0, seed=5)
    assert x1.shape == (4, 3, 32, 32) and x1.dtype == torch.uint8 and torch.equal(x1, x2)


def test_bench_prints_the_table(data):
    p = run(['bench.py', 'config/shapes.py', f'--data_dir={data}', '--unet_channels=8', '--batch_size=4', '--warmup=1',
             '--iters=2', '--sample_steps=2', '--sample_batch=2', '--device=cpu'])
    rows = dict(line.split('  ', 1) for line in p.stdout.splitlines() if '  ' in line)
    assert float(rows['train img/s'].strip()) > 0 and '%' in rows['data share of step']
    assert 'cpu' in rows['device'] and 'UNet' in rows['model']


def test_keep_best_early_stopping_and_loss_curve(data, tmp_path):
    # lr 0: the val loss never improves after the first evaluation, so patience 2 stops at the third
    p = train(data, tmp_path, '--lr=0.0', '--min_lr=0.0', '--max_iters=20', '--eval_interval=1', '--patience=2',
              '--wandb_project=nanodiffusion-test')
    assert 'wandb is not installed' in p.stdout or importlib.util.find_spec('wandb')  # optional: never required
    assert 'early stop: no better val loss in 2 evaluations' in p.stdout
    assert weights(tmp_path)['step'] == 3
    best = torch.load(tmp_path / 'best.pt', weights_only=False)
    assert best['step'] == 1 and best['stale'] == 0
    curve = Image.open(tmp_path / 'loss.png')
    assert curve.size == (640, 360)
