"""
Images from a checkpoint, below both train.py and sample.py: sample_images (a batch of labels,
captions or hints through guided + sample_loop, decoded by the dataset's VAE), what conditions it
(encode_prompts, read_hint), the labelled PNG grid and loss curve, train.py's evaluation samples
(eval_samples) and the yardsticks of the shapes data: the real images the grade compares samples
with (shapes_reference), and how closely a control model follows its hints (control_grade). Imports
neither script.
"""

import functools
import json
import math
import os
import textwrap
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from checkpoint import atomic_write
from data import Data
from model import input_shape
from samplers import guided, sample_loop


@torch.inference_mode()
def sample_images(
    model,
    diffusion,
    labels,
    meta,
    cfg_scale,
    seed=0,
    autocast=None,
    batch_size=256,
    text=None,
    null_text=None,
    hint=None,
    control_scale=1.0,
    noise=None,
    **solver,
):
    """Generate one image per label; returns uint8 [N, 3, H, W]. Seeded: the same call gives the
    same images. solver: steps, sampler, order, spacing, eta, threshold, threshold_max (see
    sample_loop). A text model: text = (states, mask, pooled) per image, null_text = the empty
    caption's (see guided). A control branch: hint [N, 1, H, W] in [0, 1], one per image, at
    strength control_scale. A latent model's samples are decoded with the VAE that prepare.py
    recorded in meta. noise: the starting noise [N, *shape] (serve.py: each request's own seed);
    None: drawn from seed."""
    # it would sample unconditioned, silently
    if model.config.text_dim and (text is None or null_text is None):
        raise SystemExit(
            "error: this is a text model: give it prompts (text=, null_text=: see encode_prompts)"
        )
    vae = load_vae(meta, labels.device)
    shape = input_shape(meta)
    g = torch.Generator(labels.device).manual_seed(seed)
    if noise is None:
        noise = torch.randn((len(labels),) + shape, generator=g, device=labels.device)
    out = []
    # a bar of the network's calls where stderr is a terminal (sample.py's grids, train.py's evals)
    starts = range(0, len(labels), batch_size)
    bar = tqdm(total=len(starts) * solver['steps'], desc='sampling', leave=False, disable=None)
    for i in starts:
        part = None if text is None else tuple(a[i : i + batch_size] for a in text)
        h = None if hint is None else hint[i : i + batch_size]
        model_fn = guided(
            model,
            diffusion,
            labels[i : i + batch_size],
            model.config.num_classes,
            cfg_scale,
            part,
            null_text,
            h,
            control_scale,
            scale_input=model.config.guidance,
        )
        with autocast or nullcontext():
            x, _ = sample_loop(
                counted(model_fn, bar), noise[i : i + batch_size], diffusion, generator=g, **solver
            )
        if not torch.isfinite(x).all():
            raise SystemExit(
                "error: sampling produced NaN/inf: the checkpoint's weights are broken (check the "
                "training loss)"
            )
        if vae is not None:
            # at the latent scaling the model was trained with (a public DiT's: SD's 0.18215), and
            # tiled automatically above the VAE's tile size
            scale, shift = meta.get('scaling_factor'), meta.get('shift_factor', 0.0)
            z = vae.from_latent(x.float()) if scale is None else x.float() / scale + shift
            x = vae.decode(z)
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    bar.close()
    return torch.cat(out)


def counted(model_fn, bar):
    """model_fn, each call ticking the progress bar."""

    def fn(x, t):
        bar.update()
        return model_fn(x, t)

    return fn


@functools.lru_cache(maxsize=1)
def _vae(name, subfolder, device):
    from vae import AutoencoderKL

    return AutoencoderKL.from_pretrained(name, subfolder or None).to(device).eval()


def load_vae(meta, device):
    """The VAE a latent dataset was encoded with (loaded once per process); None for pixel data."""
    if meta.get('kind') != 'latents':
        return None
    return _vae(meta['vae'], meta.get('vae_subfolder', ''), str(device))


def class_labels(meta, per_class):
    """per_class labels of every class, class by class; an unconditional model gets 8 rows of null
    labels."""
    if not meta['num_classes']:
        return torch.zeros(per_class * 8, dtype=torch.long)
    return torch.arange(meta['num_classes']).repeat_interleave(per_class)


def save_grid(images, captions, path, ncol=None):
    """A PNG grid, each image (upscaled to at least 64 px for legibility) under its caption."""
    n, _, h, w = images.shape
    scale = max(1, -(-64 // w))
    ncol = ncol or min(n, 8)
    tw, th = w * scale, h * scale
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, width=max(4, tw // 6)) or [''] for c in captions]
    cap_h = 11 * max(len(l) for l in lines) + 4 if any(captions) else 0
    nrow = -(-n // ncol)
    grid = Image.new('RGB', (ncol * (tw + 2) + 2, nrow * (th + cap_h + 2) + 2), 'white')
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = 2 + (i % ncol) * (tw + 2), 2 + (i // ncol) * (th + cap_h + 2)
        tile = Image.fromarray(img.permute(1, 2, 0).numpy().squeeze()).resize(
            (tw, th), Image.NEAREST
        )
        grid.paste(tile, (x, y + cap_h))
        # bottom-aligned: each caption sits right on its image
        top = y + cap_h - 11 * len(lines[i]) - 2
        draw.multiline_text((x + 1, top), '\n'.join(lines[i]), fill='black', font=font, spacing=1)
    atomic_write(path, lambda f: grid.save(f, format='PNG'))


def with_hints(images, names, hints, ncol):
    """The grid with a first row of hints [k, 1, H, W] in [0, 1]: hint j above column j (one: the
    rest blank)."""
    tiles = (hints[:, :1] * 255).round().to(torch.uint8).cpu().expand(-1, images.shape[1], -1, -1)
    blank = torch.full((ncol - len(tiles), *images.shape[1:]), 255, dtype=torch.uint8)
    return torch.cat([tiles, blank, images]), ['hint'] * len(tiles) + [''] * len(blank) + list(
        names
    )


def hint_of(file, size):
    """An image file (a path or an open binary file) as prepare.py reads hints (resized,
    centre-cropped, grey) -> [1, 1, size, size] in [0, 1]. ValueError: why it is unusable."""
    from folders import load_image

    grey = Image.fromarray(load_image(file, size).transpose(1, 2, 0)).convert('L')
    return torch.from_numpy(np.array(grey))[None, None].float() / 255


def read_hint(path, size):
    """--hint=img.png: hint_of, a bad file one line."""
    try:
        return hint_of(path, size)
    except ValueError as e:
        raise SystemExit(f"error: --hint={path}: {e}") from None


@functools.lru_cache(maxsize=1)
def _text_encoder(name, device):
    from encode import load_text_encoder

    return load_text_encoder(name, device)


def encode_prompts(texts, meta, dev):
    """Encode prompts with the text encoder that prepare.py recorded in meta (loaded once per
    process) -> (cond, empty caption), each (states, mask, pooled)."""
    from encode import encode_texts

    tokenizer, encoder = _text_encoder(meta['text_encoder'], str(dev))
    # each prompt encoded once, however often it repeats
    distinct = list(dict.fromkeys(texts))
    states, mask, pooled = encode_texts(
        distinct + [''], tokenizer, encoder, meta['text_max_len'], dev
    )
    # through fp16, as the training captions were stored: the model sees the values it was
    # trained on
    states, pooled = states.half().float(), pooled.half().float()
    pos = {t: i for i, t in enumerate(distinct)}
    idx = torch.tensor([pos[t] for t in texts], device=states.device)
    return (states[idx], mask[idx], pooled[idx]), (states[-1:], mask[-1:], pooled[-1:])


def save_loss_curve(history, path):
    """Train (grey) and val (blue) loss against step, log-scale loss, as a small PNG (PIL, no
    matplotlib)."""
    pts = [(s, math.log10(v), kind) for s, kind, v in history if v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return
    W, H, m = 640, 360, 40
    s0, s1 = min(p[0] for p in pts), max(p[0] for p in pts) or 1
    l0, l1 = min(p[1] for p in pts), max(p[1] for p in pts)
    xy = lambda s, l: (
        m + (W - 2 * m) * (s - s0) / max(s1 - s0, 1),
        H - m - (H - 2 * m) * (l - l0) / max(l1 - l0, 1e-9),
    )
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, W - m, H - m], outline='black')
    for kind, colour in (('train', (150, 150, 150)), ('val', (30, 90, 220))):
        line = [xy(s, l) for s, l, k in pts if k == kind]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
    d.text(
        (m, 8),
        f"loss (log10 {l0:.2f}..{l1:.2f}) vs step {s0}..{s1}: train grey, val (ema) blue",
        fill='black',
    )
    atomic_write(path, lambda f: img.save(f, format='PNG'))


def eval_samples(model, diffusion, meta, data_dir, val_data, k, reference, **kw):
    """train.py's evaluation samples -> (images, captions, graded) for the eval grid. graded: with k
    > 0 (shapes data) k samples per class read back -> (accuracy, factor FD dict, number graded)
    against reference (see shapes_reference); else None. Class labels: max(8, k) samples per class
    and the grid shows the first 8, so k <= 8 costs no sampling beyond the grid's. A control branch:
    the first 8 val hints, hint j for column j (the j-th sample of each class or caption, mod 8,
    graded ones too), shown as the grid's first row. kw: cfg_scale, seed, autocast, and the solver's
    (sample_images)."""
    dev, text = val_data.device, bool(model.config.text_dim)
    hints = val_data.get_hint(np.arange(8) % len(val_data)) if model.config.hint_channels else None

    def sample(labels, cond, column):
        hint = None if hints is None else hints[torch.as_tensor(column, device=dev) % 8]
        return sample_images(
            model,
            diffusion,
            labels,
            meta,
            text=cond,
            null_text=val_data.empty if text else None,
            hint=hint,
            **kw,
        )

    # the first 8 distinct val captions, 8 samples each (already encoded: no text encoder here)
    if text:
        caps = val_captions(data_dir)
        idx, names = np.repeat(list(caps.values()), 8), [c for c in caps for _ in range(8)]
        grid = sample(
            torch.zeros(len(idx), dtype=torch.long, device=dev),
            val_data.get_text(idx),
            np.arange(len(idx)),
        )
        # graded on each class's caption ("a red circle"), taken from a val image of that class
        if k:
            first = [np.flatnonzero(val_data.y == c)[:1] for c in range(meta['num_classes'])]
            idx = np.repeat(np.concatenate(first), k)
            x = sample(
                torch.zeros(len(idx), dtype=torch.long, device=dev),
                val_data.get_text(idx),
                np.arange(len(idx)),
            )
            y = val_data.y[idx]
    else:
        n = max(8, k)
        labels = class_labels(meta, n)
        # which sample of its class each one is
        nth = torch.arange(len(labels)) % n
        x, y = sample(labels.to(dev), None, nth), labels.numpy()
        grid = x[nth < 8]
        names = [
            meta['class_names'][i] if meta['num_classes'] else '' for i in labels[nth < 8].tolist()
        ]
        x, y = x[nth < k], y[(nth < k).numpy()]
    if hints is not None:
        grid, names = with_hints(grid, names, hints, 8)
    if not k:
        return grid, names, None
    from shapes import factor_fd, grade

    return grid, names, (grade(x.numpy(), y)[0], factor_fd(x.numpy(), y, *reference), len(y))


def shapes_reference(folder):
    """The real images --grade compares samples with: (factors [N, 4], labels) of the val split of a
    shapes dataset (read back by shapes.factor_matrix, exactly as the samples are, so the reader's
    biases cancel)."""
    from shapes import factor_matrix

    # checked against meta.json: a bad split is one line
    val = Data(folder, 'val', torch.device('cpu'))
    return factor_matrix(val.x), val.y


def control_scores(images, hint, meta):
    """How closely each sample follows its hint: a mask hint, the IoU of the sample's shape (the
    saturation mask shapes.read_factors uses, its largest component) with the hint; a Canny hint,
    the F1 of the sample's own Canny edges (the dataset's parameters) against the hint's, an edge
    pixel counting as found within 1 px. images uint8 [N, 3, H, W], hint [N, 1, H, W] in [0, 1].
    -> (the score's name, [N] scores)."""
    hint = hint.cpu() > 0.5
    if meta['hint'] == 'canny':
        from hints import canny

        # within 1 px
        near = lambda e: F.max_pool2d(e.float(), 3, 1, 1) > 0
        edges = canny(images, *meta['canny']) > 127
        p = (edges & near(hint)).flatten(1).sum(1) / edges.flatten(1).sum(1).clamp(min=1)
        r = (hint & near(edges)).flatten(1).sum(1) / hint.flatten(1).sum(1).clamp(min=1)
        return 'edge F1', (2 * p * r / (p + r).clamp(min=1e-9)).numpy()
    from shapes import _largest_component

    ious = []
    for img, h in zip(images.numpy(), hint[:, 0].numpy()):
        img = img.transpose(1, 2, 0)
        sat = img.max(-1).astype(int) - img.min(-1)
        m = sat > max(40, 0.5 * np.percentile(sat, 99))
        m = _largest_component(m) if m.any() else m
        ious.append((m & h).sum() / max((m | h).sum(), 1))
    return 'mask IoU', np.array(ious)


def control_grade(model, diffusion, meta, val, n, **kw):
    """A control model's grade (sample.py --grade): the first n val hints, each with its val image's
    class (a text model: its caption), sampled with the branch at kw's control_scale and as the
    base model (control_scale=0) from the same noise: how closely the samples follow their hints
    (control_scores) and their class accuracy (shapes.grade). kw: cfg_scale, seed, the solver's
    (sample_images). -> (the score's name, [(control_scale, mean score, accuracy)])."""
    from shapes import grade

    if meta.get('hint') not in ('mask', 'canny'):
        raise SystemExit(
            "error: --grade=True measures a control model on mask or canny hints, not "
            f"{meta.get('hint')!r} ones"
        )
    idx = np.arange(min(n, len(val)))
    hint, y = val.get_hint(idx), val.y[idx]
    text = bool(model.config.text_dim)
    labels = torch.zeros(len(idx), dtype=torch.long) if text else torch.as_tensor(y).long()
    cond = dict(text=val.get_text(idx), null_text=val.empty) if text else {}
    rows = []
    for scale in (kw.pop('control_scale', 1.0), 0.0):
        x = sample_images(
            model,
            diffusion,
            labels.to(val.device),
            meta,
            hint=hint,
            control_scale=scale,
            **cond,
            **kw,
        )
        name, scores = control_scores(x, hint, meta)
        rows.append((scale, float(np.mean(scores)), grade(x.numpy(), y)[0]))
    return name, rows


def val_captions(data_dir, n=8):
    """The first n distinct non-empty captions of a dataset's val split -> {caption: its first
    index}."""
    with open(os.path.join(data_dir, 'val_captions.json'), encoding='utf-8') as f:
        first = {}
        for i, c in enumerate(json.load(f)):
            first.setdefault(c, i)
    return dict(list((c, i) for c, i in first.items() if c)[:n])
