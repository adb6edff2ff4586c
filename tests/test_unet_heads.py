"""A UNet's attention heads: the most <= n_head that divide its lowest level's width, so the
README's own-images command (train.py's DiT default n_head=6 with --arch=unet --unet_channels=64)
builds, and the shapes demo's UNet (n_head=4) is exactly what it was."""

import os

import numpy as np
import torch
from PIL import Image

from model import UNet, build_model, model_args_from
from conftest import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def test_the_dit_default_n_head_fits_any_unet():
    # train.py's defaults: arch='dit', n_head=6, unet_mult=(1, 2, 2)
    cfg = dict(arch='unet', n_head=6, unet_channels=64, unet_mult=(1, 2, 2), unet_blocks=1)
    args = model_args_from(cfg, (3, 16, 16), 0)
    # 128 channels at the lowest level: 6 does not divide them, 4 is the most that does
    assert args['n_head'] == 4
    model = build_model(args)
    assert isinstance(model, UNet) and model.mid_attn.n_head == 4
    out = model(torch.randn(2, 3, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 16, 16)
    # a width 6 divides keeps 6; a DiT's n_head is never changed
    assert model_args_from(dict(cfg, unet_channels=48), (3, 16, 16), 0)['n_head'] == 6
    dit = dict(arch='dit', n_head=6, patch_size=2, n_layer=2, n_embd=384, share_blocks=1)
    assert model_args_from(dit, (3, 16, 16), 0)['n_head'] == 6


def test_shapes_unet_is_unchanged():
    cfg = {}
    exec(open(os.path.join(ROOT, 'config/shapes.py')).read(), cfg)
    # what model_args_from gave before: the shapes demo's checkpoints and weights are as they were
    assert model_args_from(cfg, (3, 32, 32), 6) == dict(
        arch='unet',
        input_size=32,
        in_channels=3,
        num_classes=6,
        n_head=4,
        channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
    )


def test_readme_own_images_command_trains(tmp_path):
    """python train.py --data_dir=data/folder --out_dir=out-folder --arch=unet --unet_channels=64
    --max_iters=20000, on a tiny folder for 1 step."""
    folder = tmp_path / 'folder'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f'{i}.png')
    data, out = tmp_path / 'data', tmp_path / 'out-folder'
    run = lambda *a: python(a, ROOT, ENV, timeout=300)
    p = run('prepare.py', f'--dataset={folder}', f'--out_dir={data}', '--resolution=16')
    assert p.returncode == 0, p.stderr
    p = run(
        'train.py',
        f'--data_dir={data}',
        f'--out_dir={out}',
        '--arch=unet',
        '--unet_channels=64',
        '--max_iters=1',
        '--batch_size=2',
        '--warmup_iters=0',
        '--ema_start=0',
        '--eval_batches=1',
        '--sample_steps=2',
    )
    assert p.returncode == 0, p.stdout + p.stderr
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True, map_location='cpu')
    assert ckpt['model_args']['arch'] == 'unet' and ckpt['model_args']['n_head'] == 4
