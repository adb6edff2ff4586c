"""Text-to-image end to end, offline: shapes captions pre-encoded with a tiny random BERT, a text
model trained on them (DiT and UNet), prompts sampled into a grid; CFG with the empty caption."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusion import Diffusion
from samplers import guided

from sample import read_prompts

from test_text import make_bert

from data import Data
from conftest import python

ENV = dict(os.environ, TQDM_DISABLE='1')
TINY = [
    '--patch_size=4',
    '--n_layer=2',
    '--n_head=2',
    '--n_embd=32',
    '--unet_channels=16',
    '--batch_size=16',
    '--lr=1e-3',
    '--warmup_iters=2',
    '--ema_start=3',
    '--ema_decay=0.9',
    '--eval_batches=1',
    '--log_interval=1',
    '--sample_steps=2',
    '--compile=False',
    '--device=cpu',
]


def run(args, check=True):
    p = python(args, ROOT, ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    enc = make_bert(str(tmp_path_factory.mktemp('bert')))
    d = str(tmp_path_factory.mktemp('data') / 'shapes')
    run(
        [
            'prepare.py',
            '--num_train=96',
            '--num_val=16',
            '--resolution=16',
            f'--text_encoder={enc}',
            '--text_max_len=8',
            f'--out_dir={d}',
        ]
    )
    return d


def test_data_swaps_in_the_empty_caption_where_dropped(data):
    d = Data(data, 'train', torch.device('cpu'), text=True)
    idx = np.array([0, 3, 5])
    states, mask, pooled = d.get_text(idx, torch.tensor([False, True, False]))
    assert states.dtype == torch.float32 and mask.dtype == torch.bool and states.shape == (3, 8, 32)
    raw = np.load(os.path.join(data, 'train_text.npy'))
    empty = np.load(os.path.join(data, 'empty_text.npy'))
    assert np.array_equal(states[0].numpy(), raw[0].astype(np.float32))
    assert np.array_equal(states[1].numpy(), empty.astype(np.float32))
    assert torch.equal(
        mask[1], torch.from_numpy(np.load(os.path.join(data, 'empty_text_mask.npy')))
    )
    assert torch.equal(
        pooled[2], torch.from_numpy(np.load(os.path.join(data, 'train_text_pooled.npy'))[5]).float()
    )
    resident = Data(data, 'train', torch.device('cpu'), text=True, resident=True).get_text(
        idx, torch.tensor([False, True, False])
    )
    # a device-side gather, same captions
    assert all(torch.equal(u, v) for u, v in zip(resident, (states, mask, pooled)))


@pytest.mark.parametrize('arch', ['dit', 'unet'])
def test_text_model_trains_and_samples_prompts(data, tmp_path, arch):
    out = tmp_path / arch
    p = run(
        [
            'train.py',
            f'--data_dir={data}',
            f'--out_dir={out}',
            f'--arch={arch}',
            '--max_iters=30',
            '--eval_interval=15',
        ]
        + TINY
    )
    assert 'conditioned on captions' in p.stdout
    losses = [float(l.split('loss ')[1].split()[0]) for l in p.stdout.splitlines() if '| lr' in l]
    assert sum(losses[-5:]) < sum(losses[:5])
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['text_dim'] == 32 and ckpt['model_args']['num_classes'] == 0
    # the eval grid, from val captions (no encoder at train time)
    assert (out / 'samples_000030.png').exists()
    # prompts: --prompt repeats, --prompts adds a file's lines; each prompt gets per_class images
    (tmp_path / 'p.txt').write_text('a blue square\n\na green triangle\n')
    p = run(
        [
            'sample.py',
            f'--out_dir={out}',
            '--prompt=a red circle',
            '--prompt=a yellow circle',
            f'--prompts={tmp_path / "p.txt"}',
            '--per_class=3',
            '--steps=2',
            '--device=cpu',
        ]
    )
    assert '(12 images' in p.stdout
    grid = np.asarray(Image.open(out / 'grid.png'))
    # 4 rows of 3, tiles upscaled to >= 64 px
    assert grid.shape[0] > 4 * 64 and grid.shape[1] > 3 * 64
    # dark text pixels in the first row's caption band (two lines of 11 px)
    assert (grid[2:24] < 128).any()
    # no prompts: the dataset's first val captions; and grading with text prompts
    p = run(
        [
            'sample.py',
            f'--out_dir={out}',
            '--per_class=1',
            '--steps=2',
            '--device=cpu',
            '--grade=True',
            '--grade_per_class=1',
        ]
    )
    assert 'conditional accuracy (text prompts' in p.stdout
    from sample import load_model, sample_images

    model, diffusion, meta, _ = load_model(str(out / 'ckpt.pt'), torch.device('cpu'))
    # never silently unconditioned
    with pytest.raises(SystemExit, match="text model: give it prompts"):
        sample_images(model, diffusion, torch.zeros(2, dtype=torch.long), meta, 4.0, steps=2)


def test_prompt_errors(data, tmp_path):
    (tmp_path / 'empty.txt').write_text('\n \n')
    with pytest.raises(SystemExit, match="no prompts"):
        read_prompts([], str(tmp_path / 'empty.txt'), data)
    with pytest.raises(SystemExit, match="cannot read --prompts"):
        read_prompts([], str(tmp_path / 'missing.txt'), data)
    with pytest.raises(SystemExit, match="needs prompts"):
        read_prompts([], '', str(tmp_path))
    assert read_prompts(['--prompt=a=b', '--steps=2'], '', data) == ['a=b']
    with open(os.path.join(data, 'val_captions.json')) as f:
        assert read_prompts([], '', data) == list(dict.fromkeys(json.load(f)))[:8]


def test_cfg_pairs_each_prompt_with_the_empty_caption():
    """One batched call: the first half conditioned on the prompts, the second on the empty caption;
    out = uncond + s * (cond - uncond)."""
    seen = {}

    def model(x, t, y, text):
        seen.update(x=x, y=y, text=text)
        # output depends on the pooled caption only
        return x * 0 + text[2][:, :1, None, None] * 10

    states, mask, pooled = (
        torch.randn(2, 4, 3),
        torch.ones(2, 4, dtype=torch.bool),
        torch.randn(2, 3),
    )
    empty = (
        torch.zeros(1, 4, 3),
        torch.tensor([[True, False, False, False]]),
        torch.full((1, 3), 0.5),
    )
    fn = guided(
        model,
        Diffusion('flow'),
        torch.zeros(2, dtype=torch.long),
        0,
        3.0,
        (states, mask, pooled),
        empty,
    )
    x = torch.randn(2, 1, 2, 2)
    out = fn(x, 0.5)
    assert seen['x'].shape[0] == 4 and torch.equal(seen['y'], torch.zeros(4, dtype=torch.long))
    s, m, p = seen['text']
    assert torch.equal(s[:2], states) and torch.equal(s[2:], empty[0].expand(2, 4, 3))
    assert torch.equal(m[2:], empty[1].expand(2, 4)) and torch.equal(p[2:], empty[2].expand(2, 3))
    cond, uncond = pooled[:, :1, None, None] * 10, 5.0
    torch.testing.assert_close(out, (uncond + 3.0 * (cond - uncond)).expand_as(x))
    # cfg_scale 1: no guidance, one un-doubled batch
    out = guided(
        model,
        Diffusion('flow'),
        torch.zeros(2, dtype=torch.long),
        0,
        1.0,
        (states, mask, pooled),
        empty,
    )(x, 0.5)
    assert seen['x'].shape[0] == 2 and torch.equal(
        out, (pooled[:, :1, None, None] * 10).expand_as(x)
    )


def test_prompt_on_a_class_model_is_refused(tmp_path):
    d = str(tmp_path / 'shapes')
    run(['prepare.py', '--num_train=32', '--num_val=16', '--resolution=16', f'--out_dir={d}'])
    run(['train.py', f'--data_dir={d}', f'--out_dir={tmp_path}', '--max_iters=1'] + TINY)
    p = run(
        ['sample.py', f'--out_dir={tmp_path}', '--prompt=a red circle', '--device=cpu'], check=False
    )
    assert p.returncode != 0 and 'not a text model' in p.stderr and 'Traceback' not in p.stderr


def test_bench_times_the_text_model(data):
    args = [
        'bench.py',
        f'--data_dir={data}',
        '--arch=unet',
        '--unet_channels=16',
        '--batch_size=4',
        '--iters=1',
        '--warmup=1',
        '--sample_batch=2',
        '--sample_steps=2',
        '--device=cpu',
    ]
    p = run(args + ['--n_head=4'])
    assert 'text 8x32' in p.stdout and 'train img/s' in p.stdout and 'sample img/s' in p.stdout
    # 32 channels do not split into 6 heads: the UNet takes the most that do (4), as train.py's
    p = run(args + ['--n_head=6'])
    assert 'train img/s' in p.stdout
