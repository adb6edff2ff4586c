"""Tests for prepare.py: shapes generation + read-back, image folders, errors, atomic output."""

import json
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare
import shapes
from conftest import one_error_line, python


# keep progress bars out of the stderr we check
ENV = dict(os.environ, TQDM_DISABLE='1')


def run(*args):
    return python(['prepare.py', *args], ROOT, ENV)


def load(out, split):
    x = np.load(os.path.join(out, f'{split}_x.npy'), mmap_mode='r')
    y = np.load(os.path.join(out, f'{split}_y.npy'), mmap_mode='r')
    with open(os.path.join(out, f'{split}_captions.json')) as f:
        return x, y, json.load(f)


def meta_of(out):
    with open(os.path.join(out, 'meta.json')) as f:
        return json.load(f)


# ---------------------------------------------------------------- shapes


def test_shapes_format(tmp_path):
    out = tmp_path / 'shapes'
    p = run('--num_train=240', '--num_val=36', f'--out_dir={out}')
    assert p.returncode == 0, p.stderr
    assert 'wrote 240 train + 36 val' in p.stdout
    meta = meta_of(out)
    assert meta['dataset'] == 'shapes' and meta['kind'] == 'pixels' and meta['channels'] == 3
    assert meta['resolution'] == 32 and meta['num_classes'] == 12 and meta['seed'] == 1337
    assert meta['class_names'][0] == 'red circle' and meta['class_names'][11] == 'yellow triangle'
    assert (
        meta['splits'] == {'train': 240, 'val': 36}
        and meta['skipped'] == []
        and meta['has_captions']
    )
    assert meta['shapes'] == shapes.SHAPES and meta['colours'] == shapes.COLOURS
    for split, n in (('train', 240), ('val', 36)):
        x, y, caps = load(out, split)
        assert x.shape == (n, 3, 32, 32) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        # balanced classes
        assert np.bincount(y, minlength=12).min() == n // 12
        assert caps == [f"a {meta['class_names'][c]}" for c in y]
    # no .tmp / .old left behind
    assert sorted(os.listdir(tmp_path)) == ['shapes']


def test_shapes_deterministic(tmp_path):
    a, b, c = (
        run('--num_train=60', '--num_val=12', f'--out_dir={tmp_path / d}', f'--seed={s}')
        for d, s in (('a', 5), ('b', 5), ('c', 6))
    )
    assert a.returncode == b.returncode == c.returncode == 0
    for split in ('train', 'val'):
        for kind in ('x', 'y'):
            fa, fb, fc = (open(tmp_path / d / f'{split}_{kind}.npy', 'rb').read() for d in 'abc')
            assert fa == fb
            assert kind == 'y' or fa != fc
    xt, _, _ = load(tmp_path / 'a', 'train')
    xv, _, _ = load(tmp_path / 'a', 'val')
    # val uses its own derived seed
    assert not np.array_equal(xt[:12], xv)


def test_shapes_look_right():
    img, y = next(shapes.shape_images(1, 32, 0))
    hwc = img.transpose(1, 2, 0).astype(int)
    sat = hwc.max(-1) - hwc.min(-1)
    # border is low-saturation background
    assert (sat[0] <= 25).all() and (sat[:, 0] <= 25).all()
    # the shape is strongly saturated
    assert sat.max() > 100


def test_read_back_accuracy():
    imgs, labels = map(np.stack, zip(*shapes.shape_images(2000, 32, 123)))
    acc, per_class = shapes.grade(imgs, labels)
    assert acc >= 0.995 and len(per_class) == 12 and min(per_class) >= 0.97
    # [N,H,W,3] too
    assert shapes.grade(imgs[:50].transpose(0, 2, 3, 1), labels[:50])[0] >= 0.98
    # generated samples are noisy: read-back must survive mild noise
    noisy = np.clip(
        imgs[:500] + np.random.default_rng(0).normal(0, 10, imgs[:500].shape), 0, 255
    ).astype(np.uint8)
    assert shapes.grade(noisy, labels[:500])[0] >= 0.98
    # other resolutions too
    big, big_labels = map(np.stack, zip(*shapes.shape_images(120, 64, 7)))
    assert shapes.grade(big, big_labels)[0] >= 0.98


def test_read_back_rejects_garbage():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 200)
    noise = rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)
    assert shapes.grade(noise, labels)[0] <= 0.1
    grey = np.full((3, 32, 32), 128, np.uint8)
    assert shapes.read_shape(grey) == ('none', 'none')
    red = np.broadcast_to(np.uint8([220, 40, 40])[:, None, None], (3, 32, 32))
    # a coloured frame is not a square
    assert shapes.read_shape(red) == ('none', 'none')


# ---------------------------------------------------------------- image folders


def solid(path, size, colour, mode='RGB', **save):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)


def make_folder(root):
    """Class folders cats/dogs with valid images in many modes, plus every kind of bad file.
    Valid images are solid colours so we can find each one again after the shuffle."""
    rng = np.random.default_rng(0)
    # relative path -> (expected RGB, class, caption)
    want = {}
    # fully transparent -> white
    solid(root / 'cats' / 'clear.png', (40, 30), (0, 0, 0, 0), 'RGBA')
    want['cats/clear.png'] = ((255, 255, 255), 0, '')
    solid(root / 'cats' / 'grey.png', (33, 45), 100, 'L')
    want['cats/grey.png'] = ((100, 100, 100), 0, '')
    # nested: still 'cats'
    solid(root / 'cats' / 'sub' / 'deep.jpg', (50, 70), (10, 200, 30), quality=95)
    want['cats/sub/deep.jpg'] = ((10, 200, 30), 0, '')
    wide = np.zeros((20, 60, 3), np.uint8)
    # blue | green | red: centre crop keeps green
    wide[:, :20, 2] = wide[:, 20:40, 1] = wide[:, 40:, 0] = 255
    Image.fromarray(wide).save(root / 'cats' / 'wide.png')
    want['cats/wide.png'] = ((0, 255, 0), 0, '')
    pal = Image.new('P', (30, 30), 0)
    pal.putpalette([200, 30, 150] + [0] * 765)
    os.makedirs(root / 'dogs')
    pal.save(root / 'dogs' / 'pal.png')
    (root / 'dogs' / 'pal.txt').write_text('  a pink dog \n')
    want['dogs/pal.png'] = ((200, 30, 150), 1, 'a pink dog')
    # 16-bit grey
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(root / 'dogs' / 'deep16.png')
    want['dogs/deep16.png'] = ((155, 155, 155), 1, '')
    solid(root / 'dogs' / 'ink.jpg', (30, 30), (0, 255, 255, 0), 'CMYK', quality=95)
    want['dogs/ink.jpg'] = ((255, 0, 0), 1, '')
    # big: draft path
    solid(root / 'dogs' / 'UPPER.JPG', (300, 200), (30, 60, 220), quality=95)
    want['dogs/UPPER.JPG'] = ((30, 60, 220), 1, '')
    # bad files
    solid(root / 'loose.png', (10, 10), (1, 2, 3))
    (root / 'dogs' / 'corrupt.png').write_bytes(rng.bytes(300))
    (root / 'dogs' / 'empty.jpg').write_bytes(b'')
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        root / 'dogs' / 'trunc.png'
    )
    data = (root / 'dogs' / 'trunc.png').read_bytes()
    (root / 'dogs' / 'trunc.png').write_bytes(data[: len(data) // 2])
    solid(root / 'dogs' / 'badcap.png', (10, 10), (9, 9, 9))
    (root / 'dogs' / 'badcap.txt').write_bytes(b'\xff\xfe\xfa not utf-8')
    # ignored: not images, hidden folders
    (root / 'notes.md').write_text('hello')
    solid(root / '.cache' / 'x.png', (10, 10), (0, 0, 0))
    skipped = {
        'loose.png': 'not in a class folder',
        'dogs/corrupt.png': 'cannot identify image file',
        'dogs/empty.jpg': 'empty file',
        'dogs/trunc.png': 'truncated',
        'dogs/badcap.png': 'UTF-8',
    }
    return want, skipped


def test_folder(tmp_path):
    src, out = tmp_path / 'pics', tmp_path / 'out'
    want, skipped = make_folder(src)
    p = run(f'--dataset={src}', f'--out_dir={out}', '--val_fraction=0.25')
    assert p.returncode == 0, p.stderr
    assert 'wrote 6 train + 2 val' in p.stdout and 'skipped 5 files' in p.stdout
    meta = meta_of(out)
    assert (
        meta['num_classes'] == 2
        and meta['class_names'] == ['cats', 'dogs']
        and meta['has_captions']
    )
    assert meta['splits'] == {'train': 6, 'val': 2} and meta['resolution'] == 32
    got = {os.path.normpath(f): r for f, r in meta['skipped']}
    assert set(got) == {os.path.normpath(f) for f in skipped}
    for f, reason in skipped.items():
        assert reason in got[os.path.normpath(f)]
        assert os.path.normpath(f) in p.stdout
    seen = []
    for split in ('train', 'val'):
        x, y, caps = load(out, split)
        assert x.shape[1:] == (3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
        for img, label, cap in zip(x, y, caps):
            mean = img.reshape(3, -1).mean(1)
            # which file is this?
            name = min(want, key=lambda f: np.abs(mean - want[f][0]).sum())
            colour, cls, caption = want[name]
            assert np.abs(mean - colour).max() < 25, (name, mean)
            # labels + captions stay aligned with images
            assert (label, cap) == (cls, caption), name
            seen.append(name)
    # every valid image exactly once
    assert sorted(seen) == sorted(want)
    x, _, _ = load(out, 'train')
    # same seed -> same shuffle
    p2 = run(f'--dataset={src}', f'--out_dir={tmp_path / "again"}', '--val_fraction=0.25')
    assert p2.returncode == 0 and np.array_equal(x, load(tmp_path / 'again', 'train')[0])


def test_folder_unconditional(tmp_path):
    src, out = tmp_path / 'flat', tmp_path / 'out'
    for i in range(5):
        solid(src / f'img{i}.png', (40 + i, 30), (i * 40, 0, 0))
    p = run(f'--dataset={src}', f'--out_dir={out}', '--resolution=16')
    assert p.returncode == 0, p.stderr
    meta = meta_of(out)
    assert meta['num_classes'] == 0 and meta['class_names'] == [] and not meta['has_captions']
    # at least one val image
    assert meta['splits'] == {'train': 4, 'val': 1}
    x, y, caps = load(out, 'train')
    assert x.shape == (4, 3, 16, 16) and (np.asarray(y) == 0).all() and caps == [''] * 4


def test_exif_rotation(tmp_path):
    a = np.zeros((40, 40, 3), np.uint8)
    # left half red
    a[:, :20, 0] = 255
    # right half blue
    a[:, 20:, 2] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    # orientation: rotate 90 degrees clockwise to display -> red on top
    exif[0x0112] = 6
    img.save(tmp_path / 'r.png', exif=exif)
    x = prepare.load_image(str(tmp_path / 'r.png'), 8)
    # top row red, bottom row not
    assert x[0, 0].mean() > 200 and x[0, -1].mean() < 50


def test_default_out_dir_name(tmp_path, monkeypatch, capsys):
    src = tmp_path / 'src' / 'My Photos'
    for i in range(2):
        solid(src / f'{i}.png', (8, 8), (0, 0, 0))
    monkeypatch.chdir(tmp_path)
    prepare.main(
        dict(
            dataset=str(src) + os.sep,
            out_dir='',
            resolution=8,
            num_train=1,
            num_val=0,
            val_fraction=0.05,
            seed=0,
            vae='none',
            vae_subfolder='',
            vae_batch=16,
            device='cpu',
        )
    )
    assert meta_of(tmp_path / 'data' / 'My Photos')['splits'] == {'train': 1, 'val': 1}
    assert 'data/My Photos' in capsys.readouterr().out


# ---------------------------------------------------------------- bad-input corpus


def write_png(path, w, h, depth, ctype, rows=b''):
    """A PNG by hand (PIL writes no 16-bit colour, nor lying headers). rows: filtered pixel
    bytes."""

    def chunk(kind, data):
        return (
            struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
        )

    ihdr = struct.pack('>IIBBBBB', w, h, depth, ctype, 0, 0, 0)
    path.write_bytes(
        b'\x89PNG\r\n\x1a\n'
        + chunk(b'IHDR', ihdr)
        + chunk(b'IDAT', zlib.compress(rows))
        + chunk(b'IEND', b'')
    )


def make_corpus(root):
    """Every kind of awkward input in one flat folder. Good images are captioned with their own
    name (so rows can be matched back after the shuffle) and come with a check of the output pixels
    [H,W,3]; bad ones come with the exact skip reason."""
    # an empty sub-folder: no class, no error
    os.makedirs(root / 'empty')
    rng = np.random.default_rng(0)
    good = {}
    ramp = np.arange(32) * 255 / 31
    # full 16-bit range
    g16 = np.tile(np.arange(32) * 65535 // 31, (32, 1)).astype(np.uint16)
    # 8-bit out must be v/257, not min(v, 255)
    Image.fromarray(g16).save(root / 'grey16.png')
    good['grey16.png'] = lambda o: np.abs(o - ramp[None, :, None]).max() <= 1
    key = np.full((32, 32), 30000, np.uint16)
    key[:, :16] = 1000
    # 16-bit colour key
    Image.fromarray(key).save(root / 'grey16_key.png', transparency=1000)
    good['grey16_key.png'] = lambda o: (
        (o[:, :16] == 255).all() and (np.abs(o[:, 16:] - 117) <= 1).all()
    )
    rgba16 = np.zeros((32, 32, 4), '>u2')
    # top opaque; bottom transparent black
    rgba16[:16] = (0, 32768, 65535, 65535)
    write_png(root / 'rgba16.png', 32, 32, 16, 6, b''.join(b'\0' + r.tobytes() for r in rgba16))
    good['rgba16.png'] = lambda o: (
        (np.abs(o[:16] - (0, 128, 255)) <= 1).all() and (o[16:] == 255).all()
    )
    # orange ink
    Image.new('CMYK', (48, 48), (0, 128, 255, 0)).save(root / 'cmyk.jpg', quality=95)
    good['cmyk.jpg'] = lambda o: (np.abs(o - (255, 127, 0)) <= 12).all()
    # big enough for the JPEG draft path
    grey = np.tile(np.linspace(0, 255, 100).astype(np.uint8), (80, 1))
    Image.fromarray(grey, 'L').save(root / 'grey.jpg', quality=95)
    good['grey.jpg'] = lambda o: (
        (o[..., :1] == o).all() and o[:, 0, 0].mean() + 150 < o[:, -1, 0].mean()
    )
    rgba = np.zeros((32, 32, 4), np.uint8)
    # transparent, red underneath: must come out white, not red
    rgba[:, :16] = (255, 0, 0, 0)
    rgba[:, 16:] = (0, 0, 255, 255)
    Image.fromarray(rgba, 'RGBA').save(root / 'rgba.png')
    good['rgba.png'] = lambda o: (o[:, :16] == 255).all() and (o[:, 16:] == (0, 0, 255)).all()
    pal = Image.new('P', (32, 32), 0)
    pal.putpalette([0, 0, 0, 20, 180, 60] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))
    # index 0 (black) is transparent
    pal.save(root / 'palette.png', transparency=0)
    good['palette.png'] = lambda o: (o[:, :16] == 255).all() and (o[:, 16:] == (20, 180, 60)).all()
    a = np.zeros((80, 120, 3), np.uint8)
    # stored red | blue; orientation 6 = turn 90 deg clockwise
    a[:, :60, 0] = a[:, 60:, 2] = 255
    photo = Image.fromarray(a)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(root / 'exif6.jpg', exif=exif, quality=95)
    # shows red on top
    good['exif6.jpg'] = lambda o: (
        (np.abs(o[:10] - (255, 0, 0)) <= 12).all() and (np.abs(o[-10:] - (0, 0, 255)) <= 12).all()
    )
    a = np.empty((4000, 6000, 3), np.uint8)
    # 24 MP photo; centre crop keeps both halves
    a[:, :3000], a[:, 3000:] = (200, 30, 30), (30, 30, 200)
    Image.fromarray(a).save(root / 'big.jpg', quality=85)
    good['big.jpg'] = lambda o: (
        (np.abs(o[:, :14] - (200, 30, 30)) <= 12).all()
        and (np.abs(o[:, 18:] - (30, 30, 200)) <= 12).all()
    )
    # 96 MP: past PIL's warning limit, below its error limit
    poster = Image.new('1', (12000, 8000), 0)
    poster.paste(1, (6000, 0, 12000, 8000))
    poster.save(root / 'poster.png')
    good['poster.png'] = lambda o: (o[:, :14] <= 5).all() and (o[:, 18:] >= 250).all()
    Image.new('RGB', (32, 32), (10, 120, 90)).save(root / 'teal.png')
    good['teal.png'] = lambda o: (o == (10, 120, 90)).all()
    for name in good:
        (root / name).with_suffix('.txt').write_text(name)
    # BOM, spaces, non-ASCII
    (root / 'teal.txt').write_bytes('\ufeff  teal.png: café — ☕\n'.encode())
    # bad: each must be skipped with exactly this reason
    bad = {}
    (root / 'zero.png').write_bytes(b'')
    bad['zero.png'] = 'empty file'
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / 'trunc.png')
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / 'trunc.jpg')
    for name in ('trunc.png', 'trunc.jpg'):
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
        bad[name] = 'truncated'
    (root / 'text.jpg').write_text('this is not a JPEG\n')
    bad['text.jpg'] = 'cannot identify image file'
    Image.new('RGB', (32, 32), (9, 9, 9)).save(root / 'badcap.png')
    (root / 'badcap.txt').write_bytes('café'.encode('latin-1'))
    bad['badcap.png'] = 'caption badcap.txt is not valid UTF-8'
    # 240 MP header, no data: PIL's hard limit
    write_png(root / 'bomb.png', 20000, 12000, 8, 2)
    bad['bomb.png'] = 'too many pixels (decompression bomb check)'
    return good, bad


def test_bad_input_corpus(tmp_path):
    src, out = tmp_path / 'corpus', tmp_path / 'out'
    good, bad = make_corpus(src)
    p = run(f'--dataset={src}', f'--out_dir={out}', '--resolution=32', '--val_fraction=0')
    assert p.returncode == 0, p.stderr
    # no bomb warning either
    assert 'Traceback' not in p.stderr and 'Warning' not in p.stderr, p.stderr
    assert (
        f'wrote {len(good)} train + 0 val images' in p.stdout
        and f'skipped {len(bad)} files' in p.stdout
    )
    meta = meta_of(out)
    assert meta['splits'] == {'train': len(good), 'val': 0} and meta['num_classes'] == 0
    assert meta['skipped'] == sorted([f, r] for f, r in bad.items())
    for f, r in bad.items():
        assert f'  skipped {f}: {r}\n' in p.stdout
    x, y, caps = load(out, 'train')
    assert x.shape == (len(good), 3, 32, 32) and (np.asarray(y) == 0).all()
    rows = dict(zip(caps, x))
    # a real caption, stored cleaned up
    assert 'teal.png: café — ☕' in caps
    rows['teal.png'] = rows.pop('teal.png: café — ☕')
    # every good file exactly once: nothing else lost
    assert sorted(rows) == sorted(good)
    for name, check in good.items():
        o = rows[name].transpose(1, 2, 0).astype(int)
        assert check(o), (name, o[::8, ::8].tolist())
    # the same files with nothing usable among them: one clear line naming each
    only = tmp_path / 'only_bad'
    only.mkdir()
    for f in [f for f in bad if f != 'bomb.png'] + ['badcap.txt']:
        (only / f).write_bytes((src / f).read_bytes())
    p = run(f'--dataset={only}', f'--out_dir={out}')
    one_error_line(
        p,
        'no usable images',
        '5 files skipped',
        *(f'{f}: {r}' for f, r in bad.items() if f != 'bomb.png'),
    )
    # the previous dataset is untouched
    assert meta_of(out)['splits']['train'] == len(good)
    (tmp_path / 'empty').mkdir()
    p = run(f'--dataset={tmp_path / "empty"}', f'--out_dir={tmp_path / "o"}')
    one_error_line(p, 'no usable images', 'no .png/.jpg', 'files found')
    assert sorted(os.listdir(tmp_path)) == ['corpus', 'empty', 'only_bad', 'out']


# ---------------------------------------------------------------- errors


def test_errors(tmp_path):
    (tmp_path / 'empty').mkdir()
    one_error_line(
        run(f'--dataset={tmp_path / "empty"}', f'--out_dir={tmp_path / "o"}'),
        'no usable images',
        'empty',
    )
    one_error_line(run(f'--dataset={tmp_path / "missing"}'), 'does not exist', 'missing')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'x.png').write_bytes(b'not an image')
    one_error_line(
        run(f'--dataset={tmp_path / "bad"}', f'--out_dir={tmp_path / "o"}'),
        'no usable images',
        '1 files skipped',
        'x.png',
    )
    # a failed run leaves no dataset behind
    assert not os.path.exists(tmp_path / 'o')
    one_error_line(run('--bogus=1'), 'bogus')
    one_error_line(run('--resolution=big'), 'resolution')
    solid(tmp_path / 'imgs' / 'a.png', (8, 8), (0, 0, 0))
    one_error_line(
        run(f'--dataset={tmp_path / "imgs"}', f'--out_dir={tmp_path / "imgs"}'), 'overlaps'
    )
    (tmp_path / 'notdata').mkdir()
    (tmp_path / 'notdata' / 'precious.txt').write_text('keep me')
    one_error_line(
        run('--num_train=12', '--num_val=0', f'--out_dir={tmp_path / "notdata"}'), 'meta.json'
    )
    assert (tmp_path / 'notdata' / 'precious.txt').exists()


# ---------------------------------------------------------------- atomic output


def test_atomic_replace(tmp_path):
    out = tmp_path / 'ds'
    assert run('--num_train=24', '--num_val=12', '--seed=1', f'--out_dir={out}').returncode == 0
    # stale leftovers of a killed run
    (tmp_path / 'ds.tmp').mkdir()
    (tmp_path / 'ds.tmp' / 'junk').write_text('x')
    p = run('--num_train=36', '--num_val=12', '--seed=2', f'--out_dir={out}')
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path)) == ['ds']
    assert meta_of(out)['seed'] == 2 and load(out, 'train')[0].shape[0] == 36
    assert not (out / 'junk').exists()
    # a previous run that died between the two renames left only ds.old: the next run puts it back
    # first, so even a run that then fails keeps the old dataset
    os.rename(out, tmp_path / 'ds.old')
    (tmp_path / 'empty').mkdir()
    assert run(f'--dataset={tmp_path / "empty"}', f'--out_dir={out}').returncode != 0
    assert sorted(os.listdir(tmp_path)) == ['ds', 'empty'] and meta_of(out)['seed'] == 2


def test_kill_leaves_complete_dataset(tmp_path):
    out = tmp_path / 'ds'
    assert run('--num_train=24', '--num_val=12', f'--out_dir={out}').returncode == 0
    proc = subprocess.Popen(
        [sys.executable, 'prepare.py', '--num_train=20000', f'--out_dir={out}'],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    # SIGKILL: no cleanup handlers run
    proc.kill()
    proc.wait()
    # whenever the kill landed, a complete dataset is there (or under .old mid-swap)
    done = out if out.exists() else tmp_path / 'ds.old'
    meta = meta_of(done)
    assert load(done, 'train')[0].shape[0] == meta['splits']['train']
    # re-running is safe
    p = run('--num_train=24', '--num_val=12', f'--out_dir={out}')
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path)) == ['ds']


def test_captions_from_metadata_jsonl(tmp_path):
    """A folder's metadata.jsonl ({"file_name", "text"} a line, as Hugging Face image folders have
    it) captions its images; NAME.txt beside an image wins; an image with neither is uncaptioned;
    a malformed line skips the folder's images with the file and line named."""
    src, out = tmp_path / 'flat', tmp_path / 'out'
    for i in range(4):
        solid(src / f'img{i}.png', (20, 20), (i * 60, 0, 0))
    lines = [{'file_name': 'img0.png', 'text': ' a red square '}, {'file_name': 'img1.png'}]
    lines[1]['caption'] = 'a dark square'
    lines.append({'file_name': 'img2.png', 'text': 'overridden'})
    (src / 'metadata.jsonl').write_text('\n'.join(json.dumps(row) for row in lines) + '\n')
    (src / 'img2.txt').write_text('from the txt')
    p = run(f'--dataset={src}', f'--out_dir={out}', '--resolution=16', '--val_fraction=0')
    assert p.returncode == 0, p.stderr
    x, y, caps = load(out, 'train')
    want = {'a red square', 'a dark square', 'from the txt', ''}
    assert sorted(caps) == sorted(want) and meta_of(out)['has_captions']
    (src / 'metadata.jsonl').write_text('{"file_name": "img0.png"}\nnot json\n')
    p = run(f'--dataset={src}', f'--out_dir={tmp_path / "bad"}', '--resolution=16')
    assert 'metadata.jsonl line 1' in p.stdout + p.stderr
