"""Tests for hints.py (Canny edges, the shapes masks) and the hints prepare.py stores and data.py
reads."""

import json
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import hints
import prepare
import shapes
from configurator import configure
from conftest import one_line_exit
from data import Data
from vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.usefixtures('one_thread')
CPU = torch.device('cpu')

# ---------------------------------------------------------------- Canny


def grow(mask, r=1):
    """mask dilated by r px in every direction (8-neighbourhood, Chebyshev distance <= r)."""
    H, W = mask.shape
    p, out = np.pad(mask, r), np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy : dy + H, dx : dx + W]
    return out


def boundary(inside):
    """The pixels of a region with a 4-neighbour outside it: where its edge truly is."""
    p = np.pad(inside, 1)
    return inside & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])


def edges_of(img, **kw):
    """hints.canny of one grey image [H, W] as a bool map."""
    out = hints.canny(torch.tensor(img)[None, None], **kw)
    assert (
        out.dtype == torch.uint8
        and out.shape == (1, 1, *img.shape)
        and set(out.unique().tolist()) <= {0, 255}
    )
    return out[0, 0].numpy() > 0


H = 48
# pixel centres
v, u = np.mgrid[:H, :H] + 0.5
# rows 12..35, columns 10..33
SQUARE = (v > 12) & (v < 36) & (u > 10) & (u < 34)
CIRCLE = (v - 24) ** 2 + (u - 24) ** 2 <= 14**2


def synthetic(inside, noise, seed=0):
    """A filled shape (200) on a flat background (60), uint8, with Gaussian noise of std `noise`
    grey levels."""
    img = np.where(inside, 200.0, 60.0) + np.random.default_rng(seed).normal(0, noise, inside.shape)
    return np.clip(img.round(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('name', ['square', 'circle'])
@pytest.mark.parametrize('noise', [0, 6])
def test_canny_finds_the_boundary(name, noise):
    inside = SQUARE if name == 'square' else CIRCLE
    edge, true = edges_of(synthetic(inside, noise)), boundary(inside)
    # boundary pixels with no edge within 1 px
    missed = true & ~grow(edge)
    # edges farther than 1 px from the boundary: the flat interior or background
    stray = edge & ~grow(true)
    assert missed.sum() == 0 and stray.sum() == 0, (missed.sum(), stray.sum())
    # thin (non-maximum suppression): never a 2x2 block of edge pixels, and about one edge pixel per
    # boundary pixel
    assert not (edge[:-1, :-1] & edge[1:, :-1] & edge[:-1, 1:] & edge[1:, 1:]).any()
    assert edge.sum() <= 1.5 * true.sum(), (edge.sum(), true.sum())
    # each row through the square's sides crosses exactly two edges, one per side
    if name == 'square':
        assert (edge[14:34].sum(1) == 2).all() and (edge[14:34, :22].sum(1) == 1).all()


def test_canny_batches_types_and_flat_images():
    imgs = np.stack(
        [synthetic(SQUARE, 6), synthetic(CIRCLE, 6), synthetic(np.zeros_like(SQUARE), 6)]
    )[:, None]
    batch = hints.canny(torch.from_numpy(imgs))
    # a batch is its images one by one; a flat noisy image has no edges
    for i, img in enumerate(imgs):
        assert torch.equal(batch[i, 0], hints.canny(torch.from_numpy(img[None]))[0, 0])
    assert batch[2].sum() == 0 and batch[0].sum() > 0
    # float in [0, 1] = the same uint8 image
    assert torch.equal(hints.canny(imgs / 255.0), batch)
    # numpy in, torch out
    assert torch.equal(hints.canny(imgs), batch)
    assert hints.canny(np.zeros((2, 3, 8, 8), np.uint8)).sum() == 0


def test_canny_colour_edges():
    """Squares on a grey background of the same brightness: no edge in grey, one in colour (the
    steepest channel)."""
    # luma 100 like the background; red (or blue) up, green down
    colours = [(160, 69, 100), (100, 81, 200)]
    imgs = np.stack(
        [
            np.where(SQUARE[..., None], np.uint8(c), np.uint8(100)).transpose(2, 0, 1)
            for c in colours
        ]
    )
    true = boundary(SQUARE)
    for img, edge in zip(imgs, hints.canny(imgs).numpy()[:, 0] > 0):
        assert edges_of(np.asarray(Image.fromarray(img.transpose(1, 2, 0)).convert('L'))).sum() == 0
        assert (true & ~grow(edge)).sum() == 0 and (edge & ~grow(true)).sum() == 0


def test_canny_hysteresis():
    """A weak edge (contrast between low and high) is kept where it joins a strong one, dropped
    where alone."""
    # one straight step down the middle, its contrast fading from 0.3 to 0.12:
    c = np.linspace(0.3, 0.12, H)[:, None]
    # strong (>= 0.2) in rows 0..26, weak below, one line
    fading = np.where(u > 24, c, 0.0)
    # the same step at a weak 0.15 all along
    lone = np.where(u > 24, 0.15, 0.0)
    # batched: one loop for both
    edge = hints.canny(torch.tensor(np.stack([fading, lone]))[:, None]).numpy()[:, 0] > 0
    # the whole line, its weak tail too
    assert edge[0, 1:-1, 23:25].any(1).all()
    # and nothing else
    assert edge[0].sum() == edge[0, :, 23:25].sum()
    # the lone weak step: no edge
    assert not edge[1].any()
    # no weak band: the tail goes, so the joining kept it above
    strong_only = edges_of(fading, low=0.2)
    assert strong_only[:24, 23:25].any(1).all() and not strong_only[30:].any()
    # and the lone step is there once weak counts as strong
    assert edges_of(lone, high=0.1)[1:-1, 23:25].any(1).all()
    # the thresholds are edge contrast: a step of 0.25 is above high=0.2, one of 0.15 is not
    assert (
        edges_of(np.where(SQUARE, 0.25, 0.0)).sum() > 0
        and edges_of(np.where(SQUARE, 0.15, 0.0)).sum() == 0
    )


# ---------------------------------------------------------------- shapes masks


def test_shape_masks_are_the_drawn_shapes():
    n, res, seed = 120, 32, (7, 0)
    draws = list(shapes.shape_draws(n, res, seed))
    ious = []
    for (img, y), m, (_, box, bg) in zip(
        shapes.shape_images(n, res, seed), hints.shape_masks(n, res, seed), draws
    ):
        assert m.shape == (1, res, res) and m.dtype == np.uint8
        # the covered fraction of each pixel
        a = m[0] / 255
        # exact: the image is background + (colour - background) x coverage, pixel by pixel, to
        # rounding
        fill, back = (
            np.array(shapes.COLOUR_RGB[y % 4], float),
            np.array([int(c) for c in bg], float),
        )
        assert np.abs(back[:, None, None] + (fill - back)[:, None, None] * a - img).max() <= 1.5
        hwc = img.transpose(1, 2, 0).astype(int)
        sat = hwc.max(-1) - hwc.min(-1)
        coloured = sat > sat.max() / 2
        ious.append((coloured & (a >= 0.5)).sum() / (coloured | (a >= 0.5)).sum())
        side = box[2] - box[0]
        area = {'circle': np.pi * side**2 / 4, 'square': side**2, 'triangle': side**2 / 2}[
            shapes.SHAPES[y // 4]
        ]
        # PIL fills a polygon's outline too: the triangles come out up to ~7% larger, in the image
        # as in the mask
        lo, hi = (0.99, 1.08) if y // 4 == 2 else (0.97, 1.03)
        assert lo < a.sum() / area < hi, (shapes.SHAPES[y // 4], a.sum() / area)
    assert np.mean(ious) > 0.95 and min(ious) > 0.8, (np.mean(ious), min(ious))


# ---------------------------------------------------------------- prepare.py and data.py


def prepare_cfg(*args):
    """prepare.py's settings after these command-line overrides, as prepare.main takes them
    (in-process: fast)."""
    return configure(dict(vars(prepare)), [*args])


def prepared(out, split='train'):
    with open(os.path.join(out, 'meta.json')) as f:
        meta = json.load(f)
    return (
        meta,
        np.load(os.path.join(out, f'{split}_x.npy')),
        np.load(os.path.join(out, f'{split}_hint.npy')),
    )


def test_prepare_shapes_mask_and_canny(tmp_path, capsys):
    for kind in ('mask', 'canny'):
        out = tmp_path / kind
        prepare.main(
            prepare_cfg(
                '--num_train=36', '--num_val=12', '--seed=3', f'--out_dir={out}', f'--hint={kind}'
            )
        )
        for split, n, sub in (('train', 36, 0), ('val', 12, 1)):
            meta, x, h = prepared(out, split)
            assert (
                meta['hint'] == kind
                and meta['hint_shape'] == [1, 32, 32]
                and h.shape == (n, 1, 32, 32)
            )
            want = (
                np.stack(list(hints.shape_masks(n, 32, (3, sub))))
                if kind == 'mask'
                else hints.canny(x).numpy()
            )
            assert h.dtype == np.uint8 and np.array_equal(h, want)
        assert (meta.get('canny') == [1.0, 0.1, 0.2]) == (kind == 'canny')
        d = Data(str(out), 'train', CPU)
        idx = np.array([0, 5, 7])
        got = d.get_hint(idx)
        assert (
            got.dtype == torch.float32
            and got.shape == (3, 1, 32, 32)
            and 0 <= got.min()
            and got.max() <= 1
        )
        assert torch.equal(got, torch.from_numpy(prepared(out)[2][idx]).float() / 255)
        # device-resident too
        assert torch.equal(Data(str(out), 'train', CPU, resident=True).get_hint(idx), got)
    assert 'skipped 0 files' in capsys.readouterr().out
    # hints change no image, and without them there is no hint array, no hint in the meta, and
    # get_hint says so
    none = tmp_path / 'none'
    prepare.main(prepare_cfg('--num_train=36', '--num_val=12', '--seed=3', f'--out_dir={none}'))
    assert np.array_equal(np.load(none / 'train_x.npy'), prepared(tmp_path / 'mask')[1])
    assert not os.path.exists(none / 'train_hint.npy') and 'hint' not in json.loads(
        (none / 'meta.json').read_text()
    )
    one_line_exit(lambda: Data(str(none), 'train', CPU).get_hint([0]), 'no hints', '--hint')


def test_prepare_hint_files(tmp_path, capsys):
    src, out = tmp_path / 'pics', tmp_path / 'out'
    src.mkdir()
    # image i: solid colour; its hint: grey 40 * i + 10, in various formats
    for i in range(6):
        Image.new('RGB', (24 + i, 20), (40 * i, 255 - 40 * i, 100)).save(src / f'img{i}.png')
        grey = 40 * i + 10
        if i == 1:
            # any image type
            Image.new('RGB', (24 + i, 20), (grey,) * 3).save(src / f'img{i}.hint.jpg', quality=100)
        # a 16-bit depth map, as depth tools write them
        elif i == 2:
            Image.fromarray(np.full((20, 24 + i), grey * 257, np.uint16)).save(
                src / f'img{i}.hint.png'
            )
        else:
            Image.new('L', (24 + i, 20), grey).save(src / f'img{i}.hint.png')
    wide = np.zeros((20, 60), np.uint8)
    # cropped like its image to columns 20..40 (of 60): dark 20..25, white 25..40
    wide[:, 25:] = 255
    Image.fromarray(wide).save(src / 'wide.hint.png')
    Image.new('RGB', (60, 20), (0, 255, 0)).save(src / 'wide.png')
    # bad: no hint file
    Image.new('RGB', (20, 20), (1, 2, 3)).save(src / 'nohint.png')
    Image.new('RGB', (20, 20), (4, 5, 6)).save(src / 'corrupt.png')
    # bad: not an image
    (src / 'corrupt.hint.png').write_bytes(np.random.default_rng(0).bytes(200))
    Image.new('RGB', (20, 20), (7, 8, 9)).save(src / 'empty.png')
    (src / 'empty.hint.png').write_bytes(b'')
    # a bad image is skipped for itself, whatever its hint
    (src / 'broken.png').write_bytes(b'not a png')
    Image.new('L', (20, 20), 99).save(src / 'broken.hint.png')
    # a hint without an image: no image itself
    Image.new('L', (20, 20), 99).save(src / 'orphan.hint.png')
    prepare.main(
        prepare_cfg(
            f'--dataset={src}',
            f'--out_dir={out}',
            '--resolution=16',
            '--val_fraction=0.25',
            '--hint=file',
        )
    )
    printed = capsys.readouterr().out
    skipped = {
        'nohint.png': 'no hint file nohint.hint.png',
        'corrupt.png': 'hint corrupt.hint.png: cannot identify image file',
        'empty.png': 'hint empty.hint.png: empty file',
        # the image's own reason
        'broken.png': 'cannot identify image file',
    }
    meta = prepared(out)[0]
    assert meta['skipped'] == sorted([f, r] for f, r in skipped.items())
    assert 'wrote 5 train + 2 val' in printed and 'skipped 4 files' in printed
    for f, r in skipped.items():
        assert f'  skipped {f}: {r}\n' in printed
    assert (
        meta['hint'] == 'file'
        and meta['hint_shape'] == [1, 16, 16]
        and meta['splits'] == {'train': 5, 'val': 2}
    )
    files = ['meta.json'] + [
        f'{s}_{k}.{e}'
        for s in ('train', 'val')
        for k, e in (('x', 'npy'), ('y', 'npy'), ('hint', 'npy'), ('captions', 'json'))
    ]
    # no scratch arrays left behind
    assert sorted(os.listdir(out)) == sorted(files)
    seen = []
    for split in ('train', 'val'):
        _, x, h = prepared(out, split)
        assert h.shape == (len(x), 1, 16, 16)
        # every image still has its own hint after the shuffle
        for img, hint in zip(x, h):
            # the green wide.png (the others have blue 100)
            if (img[2] == 0).all():
                # squashed: dark to 6
                assert (hint[0, :, :3] < 20).all() and (hint[0, :, 6:] > 235).all(), hint[0, 0]
                seen.append('wide')
                continue
            i = round(img[0].mean() / 40)
            assert (img[0] == 40 * i).all() and (
                np.abs(hint.astype(int) - (40 * i + 10)) <= 1
            ).all(), (i, hint.mean())
            seen.append(i)
    assert sorted(seen, key=str) == [0, 1, 2, 3, 4, 5, 'wide']
    d = Data(str(out), 'val', CPU)
    assert torch.equal(d.get_hint([0, 1]), torch.from_numpy(prepared(out, 'val')[2]).float() / 255)


def test_prepare_hint_errors(tmp_path):
    (tmp_path / 'pics').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'pics' / 'a.png')
    one_line_exit(lambda: prepare.main(prepare_cfg('--hint=file')), '--hint=file', 'image folder')
    one_line_exit(
        lambda: prepare.main(prepare_cfg(f'--dataset={tmp_path / "pics"}', '--hint=mask')), 'shapes'
    )
    one_line_exit(lambda: prepare.main(prepare_cfg('--hint=edges')), 'hint')
    one_line_exit(
        lambda: prepare.main(prepare_cfg('--hint=canny', '--canny=(1.0, 0.3, 0.2)')),
        'canny',
        'low <= high',
    )
    prepare.main(
        prepare_cfg('--num_train=12', '--num_val=12', f'--out_dir={tmp_path / "ds"}', '--hint=mask')
    )
    h = tmp_path / 'ds' / 'train_hint.npy'
    # a hint array from another run: one line, not a crash
    np.save(h, np.zeros((12, 1, 16, 16), np.uint8))
    one_line_exit(
        lambda: Data(str(tmp_path / 'ds'), 'train', CPU),
        'train_hint.npy has shape',
        're-run prepare.py',
    )
    h.write_bytes(h.read_bytes()[:100])
    one_line_exit(
        lambda: Data(str(tmp_path / 'ds'), 'train', CPU), 'train_hint.npy is missing or truncated'
    )


def test_prepare_latents_keep_pixel_hints(tmp_path):
    """With a VAE the hint stays at the pixel resolution, and get_hint mirrors it with the flipped
    latents."""
    torch.manual_seed(0)
    cfg = VAEConfig(
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    folder = tmp_path / 'vae'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(dict(asdict(cfg), _class_name='AutoencoderKL')))
    save_file(
        {k: v.contiguous() for k, v in AutoencoderKL(cfg).state_dict().items()},
        str(folder / 'diffusion_pytorch_model.safetensors'),
    )
    out = tmp_path / 'lat'
    prepare.main(
        prepare_cfg(
            '--num_train=12',
            '--num_val=4',
            '--resolution=16',
            f'--out_dir={out}',
            f'--vae={folder}',
            '--hint=canny',
            '--device=cpu',
        )
    )
    meta, x, h = prepared(out)
    assert (
        meta['kind'] == 'latents'
        and meta['latent_shape'] == [4, 8, 8]
        and meta['hint_shape'] == [1, 16, 16]
    )
    assert np.array_equal(h, hints.canny(x).numpy())
    d = Data(str(out), 'train', CPU)
    flip = torch.tensor([False, True])
    got = d.get_hint([2, 3], flip)
    assert got.shape == (2, 1, 16, 16) and d.get([2, 3], flip=flip)[0].shape == (2, 4, 8, 8)
    assert torch.equal(got[0], d.get_hint([2])[0]) and torch.equal(
        got[1], d.get_hint([3])[0].flip(-1)
    )
