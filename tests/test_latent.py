"""Latent diffusion end to end with a tiny random VAE saved in diffusers' layout: prepare -> train
-> sample."""

import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vae import AutoencoderKL, VAEConfig
from conftest import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', TQDM_DISABLE='1')


def run(args):
    p = python(args, ROOT, ENV, timeout=300)
    assert p.returncode == 0, f"{args}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('latent')
    torch.manual_seed(0)
    cfg = VAEConfig(
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    vae = AutoencoderKL(cfg)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp / 'vae'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(dict(asdict(cfg), _class_name='AutoencoderKL')))
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()},
        str(folder / 'diffusion_pytorch_model.safetensors'),
    )
    data = tmp / 'data'
    run(
        [
            'prepare.py',
            '--num_train=64',
            '--num_val=8',
            '--resolution=16',
            f'--vae={folder}',
            f'--out_dir={data}',
        ]
    )
    return vae.eval(), folder, data, tmp


def test_prepare_stores_posterior_mean_std_and_flip(setup):
    vae, folder, data, _ = setup
    meta = json.loads((data / 'meta.json').read_text())
    assert meta['kind'] == 'latents' and meta['vae'] == str(folder)
    assert (
        meta['latent_shape'] == [4, 8, 8]
        and meta['scaling_factor'] == 0.5
        and meta['shift_factor'] == 0.1
    )
    lat = np.load(data / 'train_latents.npy', mmap_mode='r')
    assert lat.shape == (64, 2, 2, 4, 8, 8) and lat.dtype == np.float16
    x = torch.from_numpy(np.load(data / 'train_x.npy')[:4]).float() / 127.5 - 1
    with torch.no_grad():
        post, flipped = vae.encode(x), vae.encode(x.flip(-1))
    for got, want in (
        (lat[:4, 0, 0], post.mean),
        (lat[:4, 0, 1], post.std),
        (lat[:4, 1, 0], flipped.mean),
    ):
        # fp16 storage
        np.testing.assert_allclose(got.astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3)


def test_empty_val_split_gets_an_empty_latent_array(setup, tmp_path):
    import prepare

    _, folder, data, _ = setup
    np.save(tmp_path / 'train_x.npy', np.load(data / 'train_x.npy')[:3])
    np.save(tmp_path / 'val_x.npy', np.zeros((0, 3, 16, 16), np.uint8))
    meta = prepare.encode_latents(str(tmp_path), str(folder), '', 2, 'cpu')
    assert meta['latent_shape'] == [4, 8, 8]
    assert np.load(tmp_path / 'val_latents.npy').shape == (0, 2, 2, 4, 8, 8)
    assert np.load(tmp_path / 'train_latents.npy').shape == (3, 2, 2, 4, 8, 8)


def test_training_draws_normalised_posterior_samples(setup):
    from data import Data

    _, _, data, _ = setup
    d = Data(str(data), 'train', torch.device('cpu'))
    lat = torch.from_numpy(np.load(data / 'train_latents.npy')[[3, 5]]).float()
    eps, flip = torch.randn(2, 4, 8, 8), torch.tensor([False, True])
    z, _ = d.get(np.array([3, 5]), eps, flip)
    want = torch.stack([lat[0, 0, 0] + lat[0, 0, 1] * eps[0], lat[1, 1, 0] + lat[1, 1, 1] * eps[1]])
    torch.testing.assert_close(z, (want - 0.1) * 0.5)
    # resident on the device (what a GPU does when the split fits): the same batch from a
    # device-side gather
    r = Data(str(data), 'train', torch.device('cpu'), resident=True)
    # auto: resident only on a GPU
    assert r.resident and not d.resident
    zr, yr = r.get(np.array([3, 5]), eps, flip)
    assert torch.equal(zr, z) and torch.equal(yr, d.get(np.array([3, 5]))[1])


def test_train_and_sample_decode_through_the_vae(setup):
    _, _, data, tmp = setup
    out = tmp / 'out'
    run(
        [
            'train.py',
            f'--data_dir={data}',
            f'--out_dir={out}',
            '--patch_size=2',
            '--n_layer=2',
            '--n_head=2',
            '--n_embd=32',
            '--batch_size=8',
            '--max_iters=3',
            '--sample_steps=2',
            '--device=cpu',
            '--compile=False',
        ]
    )
    assert (out / 'samples_000003.png').exists()
    run(['sample.py', f'--out_dir={out}', '--steps=2', '--per_class=1', '--device=cpu'])
    grid = np.asarray(Image.open(out / 'grid.png'))
    # 12 classes x 1: 16 px decoded, shown at 64 px
    assert grid.shape[0] > 12 * 64 and grid.shape[1] == 64 + 4


def test_a_latent_model_distils_and_its_student_decodes(setup):
    """Distillation on latents: the teacher above, one 2-step round of 2 steps (the loop draws
    posterior samples as in training), sampled with the student's grid and decoded."""
    _, _, data, tmp = setup
    if not (tmp / 'out' / 'ckpt.pt').exists():
        test_train_and_sample_decode_through_the_vae(setup)
    st = tmp / 'student'
    run(
        [
            'train.py',
            f'--data_dir={data}',
            f'--out_dir={st}',
            f"--init_from={tmp / 'out' / 'ckpt.pt'}",
            '--distill_steps=(2,)',
            '--batch_size=8',
            '--max_iters=2',
            '--eval_interval=0',
            '--sample_steps=2',
            '--device=cpu',
            '--compile=False',
        ]
    )
    p = run(['sample.py', f'--out_dir={st}', '--per_class=1', '--device=cpu'])
    assert "ddim the student's grid, 2 steps" in p.stdout and (st / 'grid.png').exists()


def test_non_finite_example_is_skipped_and_counted(setup, tmp_path):
    import shutil

    _, _, data, _ = setup
    bad = tmp_path / 'bad'
    shutil.copytree(data, bad)
    lat = np.load(bad / 'train_latents.npy', mmap_mode='r+')
    # one corrupt example: the one step per epoch that draws it gets a NaN gradient
    lat[10] = np.nan
    lat.flush()
    del lat
    args = [
        'train.py',
        f'--data_dir={bad}',
        f'--out_dir={tmp_path / "out"}',
        '--patch_size=2',
        '--n_layer=1',
        '--n_head=2',
        '--n_embd=16',
        '--batch_size=8',
        '--max_iters=8',
        '--sample_steps=2',
        '--device=cpu',
        '--compile=False',
        '--log_interval=4',
    ]
    # skipped on the device (no host sync a step), counted and reported at the next log line
    p = run(args)
    # 8 steps = one epoch
    assert p.stdout.count('1 non-finite gradient(s) since the last log: update(s) skipped') == 1
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['bad_steps'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    # every example broken: it stops after max_bad_steps in a row, with a one-line reason
    lat = np.load(bad / 'train_latents.npy', mmap_mode='r+')
    lat[:] = np.nan
    lat.flush()
    del lat
    q = python(args + ['--max_bad_steps=3', '--log_interval=1'], ROOT, ENV)
    assert (
        q.returncode != 0
        and '3 non-finite gradients in a row by step 3' in q.stderr
        and 'Traceback' not in q.stderr
    )
