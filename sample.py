"""
Sample from a trained checkpoint with classifier-free guidance, write a PNG grid:

    python sample.py --out_dir=out-shapes                    # grid of every class -> out-shapes/grid.png
    python sample.py --out_dir=out-shapes --grade=True       # shapes only: read samples back, print accuracy, factor FD
    python sample.py --out_dir=out-shapes --save_dir=samples --num_samples=5000   # PNGs + samples.json, for metrics.py
    python sample.py --out_dir=out-shapes --sampler=ddpm --steps=1000 --spacing=linspace
    python sample.py --out_dir=out-emoji --prompt="red heart" --prompt="grinning face"   # text models
    python sample.py --out_dir=out-emoji --prompts=prompts.txt                          # one prompt per line
    python sample.py --out_dir=out-mask --hint=mask.png --control_scale=0.8   # a control branch: the grid's first row
    python sample.py --out_dir=out-mask --hint=val                             # shows the hints (val: one per column)
    python sample.py --out_dir=out-distill --ckpt_name=student1.pt   # a distilled student: its own steps and grid, 1 call each

Samplers (in diffusion.py: sample_loop, on the alpha/sigma of diffusion.Diffusion): UniPC 1/2/3
(Zhao et al. 2023; the default: order 3 on the 'flowtime' grid below 30 steps, 'logsnr' above, for
every objective: diffusion.default_solver, chosen by bench_samplers.py), DPM-Solver++ 1/2/3 (Lu et
al. 2022), DDIM (Song et al. 2021, eta >= 0), DDPM ancestral (Ho et al. 2020), Euler/Heun for flow
models. CFG: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022). Each is checked against
diffusers' scheduler of the same name in tests/test_sampler.py.

    python sample.py --out_dir=out-shapes --steps=5 --tune=True   # fit a 5-step solver to this checkpoint (grids.json)
"""

import functools
import json
import math
import os
import sys
import textwrap
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from checkpoint import atomic_write, load_model
import distill
from configurator import check
from data import Data, read_meta
from diffusion import SAMPLERS, SPACINGS, default_solver, guided, sample_loop, tune_solver
from model import input_shape, setup_device

# -----------------------------------------------------------------------------
# where the checkpoint is, and where the grid goes
out_dir = 'out'
# or 'best.pt', or 'model.safetensors' (the shareable export: EMA weights)
ckpt_name = 'ckpt.pt'
# solver steps; NFE = steps (heun: 2*steps-1); CFG's cond+uncond is one batched call;
# 0 = auto: 20, or a distilled student's own (its checkpoint records its steps and grid)
steps = 0
# 'dpm++', 'unipc', 'ddim', 'ddpm', 'euler', 'heun' (the last two: flow models);
# 'auto': the default (diffusion.default_solver, chosen by bench_samplers.py)
sampler = 'auto'
# dpm++ and unipc order: 1, 2 or 3; 0 = the default's
order = 0
# step times: 'logsnr', 'karras', time-uniform 'linspace', 'leading', 'trailing', or
# 'auto': the solver tuned to this checkpoint (out_dir/grids.json) if any, else the default's
spacing = 'auto'
# first fit the solver to this checkpoint (diffusion.tune_solver), save it to grids.json
tune = False
# noise samples the solver is fitted on (classes in turn)
tune_batch = 48
# its gradient steps: ~3 * tune_iters * steps model calls on tune_batch samples
tune_iters = 200
# ddim: 0 = deterministic, 1 = DDPM
eta = 0.0
# Imagen dynamic thresholding quantile of |x0| (e.g. 0.995); 0 = off
threshold = 0.0
threshold_max = 1.0
# 1 = no guidance
cfg_scale = 4.0
# grid: images per class or prompt (unconditional models: per_class * 8 images)
per_class = 8
# text models: --prompt="a red circle", repeatable (default: the dataset's val captions);
# read from the command line by read_prompts: every --prompt=... counts
prompt = ''
# text models: a text file, one prompt per line
prompts = ''
# a control branch's hint: an image (every sample's), or 'val': the dataset's val hints, one
# per grid column (save_dir: each val hint in turn); '' = none, the base model. Not for --grade
hint = ''
# the branch's strength: 0 = the base model, 1 = as trained
control_scale = 1.0
# shapes only: sample grade_per_class images per class and read them back
grade = False
grade_per_class = 40
# --grade's real images (the val split) and default prompts; '' = the model's dataset
data_dir = ''
# instead of the grid: num_samples PNGs + samples.json here (what metrics.py reads)
save_dir = ''
# with save_dir: the classes (or prompts) in turn, deterministic from seed
num_samples = 0
batch_size = 256
use_ema = True
seed = 0
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------


def check_config():
    """What each setting may be, in one place: a bad value is one line before the checkpoint is even
    read."""
    check(
        globals(),
        positive=('per_class', 'grade_per_class', 'batch_size'),
        non_negative=('steps', 'eta', 'cfg_scale', 'seed'),
        fraction=('threshold',),
        choices=dict(
            sampler=('auto',) + SAMPLERS,
            order=(0, 1, 2, 3),
            spacing=('auto',) + SPACINGS,
            dtype=('auto', 'float32', 'bfloat16', 'float16'),
        ),
    )
    if tune and (spacing != 'auto' or sampler in ('ddpm', 'heun') or sampler == 'ddim' and eta > 0):
        sys.exit(
            "error: --tune=True fits the solver for --spacing=auto and a deterministic sampler of one call a step "
            "(not ddpm or heun; eta = 0)"
        )
    if threshold_max < 1:
        sys.exit(f"error: --threshold_max={threshold_max} must be >= 1")
    if num_samples < 0 or bool(save_dir) != (num_samples > 0):
        sys.exit(
            f"error: --save_dir={save_dir!r} and --num_samples={num_samples} go together: a folder, a count > 0"
        )


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
    **solver,
):
    """Generate one image per label; returns uint8 [N, 3, H, W]. Seeded: the same call gives the
    same images. solver: steps, sampler, order, spacing, eta, threshold, threshold_max (see
    sample_loop). A text model: text = (states, mask, pooled) per image, null_text = the empty
    caption's (see guided). A control branch: hint [N, 1, H, W] in [0, 1], one per image, at
    strength control_scale. A latent model's samples are decoded with the VAE that prepare.py
    recorded in meta."""
    # it would sample unconditioned, silently
    if model.config.text_dim and (text is None or null_text is None):
        raise SystemExit(
            "error: this is a text model: give it prompts (text=, null_text=: see encode_prompts)"
        )
    vae = load_vae(meta, labels.device)
    shape = input_shape(meta)
    g = torch.Generator(labels.device).manual_seed(seed)
    noise = torch.randn((len(labels),) + shape, generator=g, device=labels.device)
    out = []
    for i in range(0, len(labels), batch_size):
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
                model_fn, noise[i : i + batch_size], diffusion, generator=g, **solver
            )
        if not torch.isfinite(x).all():
            raise SystemExit(
                "error: sampling produced NaN/inf: the checkpoint's weights are broken (check the training loss)"
            )
        if vae is not None:
            # tiled automatically above the VAE's tile size
            x = vae.decode(vae.from_latent(x.float()))
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


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


def read_hint(path, size):
    """--hint=img.png as prepare.py reads hints (resized, centre-cropped, grey) -> [1, 1, size,
    size] in [0, 1]."""
    from prepare import load_image

    try:
        grey = Image.fromarray(load_image(path, size).transpose(1, 2, 0)).convert('L')
    except ValueError as e:
        raise SystemExit(f"error: --hint={path}: {e}") from None
    return torch.from_numpy(np.array(grey))[None, None].float() / 255


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


def save_samples(generate, asked, labels, meta, folder, info):
    """One PNG per entry of `asked` (class indices or prompts) in `folder`, 000000.png, ..., sampled
    batch_size at a time (batch k from seed * 1_000_003 + k: the same command writes the same bytes,
    and a longer run starts with the same images), then folder/samples.json, atomically and last:
    when it exists, every file it names is complete. labels: the class each image was asked for, -1
    for none (a prompt that is no class, unconditional)."""
    manifest = os.path.join(folder, 'samples.json')
    files = []
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(manifest):
            # until the new one is written, no manifest names a mix of old and new files
            os.remove(manifest)
        with tqdm(total=len(asked), unit='img', desc=f'sampling to {folder}') as bar:
            for k, start in enumerate(range(0, len(asked), batch_size)):
                for img in generate(asked[start : start + batch_size], seed * 1_000_003 + k, start):
                    files.append(f"{len(files):06d}.png")
                    Image.fromarray(img.permute(1, 2, 0).numpy().squeeze()).save(
                        os.path.join(folder, files[-1])
                    )
                bar.update(min(batch_size, len(asked) - start))
    except OSError as e:
        raise SystemExit(f"error: cannot write samples to '{folder}' ({e.strerror or e})") from None
    names = meta.get('class_names') or []
    doc = dict(
        files=files,
        labels=labels,
        classes=[names[y] if y >= 0 else '' for y in labels],
        prompts=[a if isinstance(a, str) else '' for a in asked],
        **info,
    )
    text = (
        '{\n'
        + ',\n'.join(
            f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in doc.items()
        )
        + '\n}\n'
    )
    # one key a line: readable at any N
    atomic_write(manifest, lambda f: f.write(text.encode('utf-8')))
    return manifest


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


def read_prompts(argv, path, data_dir):
    """The prompts for a text model: every --prompt=... in argv (the flag repeats), then the lines
    of `path`; if there are none, the first 8 distinct captions of the dataset's val split."""
    found = [a.split('=', 1)[1] for a in argv if a.startswith('--prompt=')]
    if path:
        try:
            with open(path, encoding='utf-8') as f:
                found += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(
                f"error: cannot read --prompts file '{path}' ({getattr(e, 'strerror', None) or e})"
            )
        if not found:
            raise SystemExit(f"error: --prompts file '{path}' has no prompts (one per line)")
    if not found:
        try:
            found = list(val_captions(data_dir))
        except OSError:
            raise SystemExit(
                "error: a text model needs prompts: pass --prompt=\"...\" or --prompts=file.txt"
            ) from None
    return found


def val_captions(data_dir, n=8):
    """The first n distinct non-empty captions of a dataset's val split -> {caption: its first
    index}."""
    with open(os.path.join(data_dir, 'val_captions.json'), encoding='utf-8') as f:
        first = {}
        for i, c in enumerate(json.load(f)):
            first.setdefault(c, i)
    return dict(list((c, i) for c, i in first.items() if c)[:n])


@functools.lru_cache(maxsize=1)
def _text_encoder(name, device):
    from prepare import load_text_encoder

    return load_text_encoder(name, device)


def encode_prompts(texts, meta, dev):
    """Encode prompts with the text encoder that prepare.py recorded in meta (loaded once per
    process) -> (cond, empty caption), each (states, mask, pooled)."""
    from prepare import encode_texts

    tokenizer, encoder = _text_encoder(meta['text_encoder'], str(dev))
    # each prompt encoded once, however often it repeats
    distinct = list(dict.fromkeys(texts))
    states, mask, pooled = encode_texts(
        distinct + [''], tokenizer, encoder, meta['text_max_len'], dev
    )
    # through fp16, as the training captions were stored: the model sees the values it was trained
    # on
    states, pooled = states.half().float(), pooled.half().float()
    pos = {t: i for i, t in enumerate(distinct)}
    idx = torch.tensor([pos[t] for t in texts], device=states.device)
    return (states[idx], mask[idx], pooled[idx]), (states[-1:], mask[-1:], pooled[-1:])


def solver_settings(diffusion, grids, student=None):
    """What sample_loop gets: each 'auto' (order 0) setting from the default
    (diffusion.default_solver), and for spacing 'auto' the solver tuned to this checkpoint for this
    sampler, order, steps and cfg (its grid and matrix), if grids.json has one. A distilled student
    (its checkpoint's record: steps, times) gets DDIM on its own grid, what it learned to take, when
    sampler and spacing are 'auto' and steps is its own. -> (solver dict, grids.json key)."""
    if student and student['steps'] == steps and sampler == 'auto' and spacing == 'auto':
        return dict(
            distill.solver(student),
            order=1,
            eta=0.0,
            threshold=threshold,
            threshold_max=threshold_max,
        ), None
    d = default_solver(diffusion.objective, steps)
    s = dict(
        sampler=d['sampler'] if sampler == 'auto' else sampler,
        order=order or d['order'],
        eta=eta,
        threshold=threshold,
        threshold_max=threshold_max,
    )
    key = f"{s['sampler']}{s['order']} {steps} steps cfg {cfg_scale:g}"
    tuned = grids.get(key, {}) if spacing == 'auto' else {}
    s['spacing'], s['matrix'] = (
        tuned.get('t', spacing if spacing != 'auto' else d['spacing']),
        tuned.get('matrix'),
    )
    return s, key


def read_grids(folder):
    """folder/grids.json, the solvers tuned to the checkpoint there ({key: {'t': [times], 'matrix':
    [[...]], ...}}); {} if none."""
    path = os.path.join(folder, 'grids.json')
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            grids = json.load(f)
        if not all(
            isinstance(g['t'], list) and len(g.get('matrix') or g['t']) == len(g['t'])
            for g in grids.values()
        ):
            raise ValueError('a grid without its times, or a solver matrix of another length')
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise SystemExit(
            f"error: {path} is not a grids file ({e}): delete it, or re-run with --tune=True"
        ) from None
    return grids


def tune_and_save(model, diffusion, meta, cond, solver, key, grids, autocast):
    """Fit the solver to this checkpoint (diffusion.tune_solver) on tune_batch noise samples with
    the conditions cond = (labels, text, null_text), at this cfg; add its grid and matrix to
    out_dir/grids.json (atomically)."""
    labels, text, empty = cond
    # not the noise the samples are drawn from
    g = torch.Generator(labels.device).manual_seed(seed + 1_000_003)
    x = torch.randn((len(labels),) + input_shape(meta), generator=g, device=labels.device)
    model_fn = guided(
        model.requires_grad_(False),
        diffusion,
        labels,
        model.config.num_classes,
        cfg_scale,
        text,
        empty,
        scale_input=model.config.guidance,
    )
    t0 = time.time()
    with autocast:
        matrix, info = tune_solver(
            model_fn,
            x,
            diffusion,
            steps,
            solver['sampler'],
            solver['order'],
            solver['spacing'],
            iters=tune_iters,
        )
    print(
        f"tuned {key}: RMS error vs a converged solve {info['start_error']:.4f} -> {info['error']:.4f} on "
        f"{len(labels)} samples, {tune_iters} steps, {time.time() - t0:.0f} s; reference converged to {info['ref_change']:.1e}"
    )
    t = diffusion.sampling_schedule(steps, solver['spacing'])[0].tolist()
    grids[key] = dict(t=t, matrix=matrix.tolist(), checkpoint=ckpt_name, batch=len(labels), **info)
    text_out = json.dumps(grids, indent=1)
    atomic_write(os.path.join(out_dir, 'grids.json'), lambda f: f.write(text_out.encode('utf-8')))
    return dict(spacing=t, matrix=grids[key]['matrix'])


def main():
    global steps
    from configurator import configure

    argv = sys.argv[1:]
    # repeatable: read below
    configure(globals(), [a for a in argv if not a.startswith('--prompt=')])
    check_config()
    dev, _, autocast = setup_device(device, dtype)
    model, diffusion, meta, train_config = load_model(
        os.path.join(out_dir, ckpt_name), dev, use_ema
    )
    # a distilled student's record (train.py --distill_steps)
    student = train_config.get('student')
    steps = steps or (student or {}).get('steps') or 20
    lo, hi = (student or {}).get('cfg') or (cfg_scale, cfg_scale)
    if not lo <= cfg_scale <= hi:
        print(
            f"warning: {out_dir}/{ckpt_name} learned CFG scales {lo:g} to {hi:g}: --cfg_scale={cfg_scale:g} is outside them"
        )
    grids = read_grids(out_dir)
    solver, key = solver_settings(diffusion, grids, student)
    if tune and key is None:
        raise SystemExit(
            "error: --tune=True: a distilled student samples on its own grid; name --sampler or --spacing"
        )
    is_text = bool(model.config.text_dim)
    if (prompts or any(a.startswith('--prompt=') for a in argv)) and not is_text:
        raise SystemExit(
            f"error: {out_dir}/{ckpt_name} is not a text model (it was trained on class labels): drop --prompt"
        )
    if hint and not model.config.hint_channels:
        raise SystemExit(
            f"error: {out_dir}/{ckpt_name} has no control branch (it was trained without hints): drop --hint"
        )
    data = data_dir or train_config.get('data_dir', '')
    # the grid's columns
    ncol = per_class if (meta['num_classes'] or is_text) else 8
    # a control branch's: image i gets hints[i % len(hints)]
    hints = None
    # one per grid column; save_dir: each in turn
    if hint == 'val':
        val = Data(data, 'val' if read_meta(data)['splits'].get('val') else 'train', dev)
        hints = val.get_hint(np.arange(min(num_samples, len(val)) if save_dir else ncol) % len(val))
    elif hint:
        hints = read_hint(hint, model.config.hint_size).to(dev)
    # on the classes in turn (a text model: the prompts in turn)
    if tune:
        asked = (
            read_prompts(argv, prompts, data)
            if is_text
            else list(range(max(meta['num_classes'], 1)))
        )
        asked = [asked[i % len(asked)] for i in range(tune_batch)]
        cond = encode_prompts(asked, meta, dev) if is_text else (None, None)
        labels = torch.tensor(
            [0] * tune_batch if is_text or not meta['num_classes'] else asked, device=dev
        )
        solver.update(
            tune_and_save(model, diffusion, meta, (labels,) + cond, solver, key, grids, autocast)
        )
    grid = (
        solver['spacing']
        if isinstance(solver['spacing'], str)
        else "the student's grid"
        if not key
        else 'tuned solver'
        if solver['matrix']
        else 'tuned grid'
    )
    name = solver['sampler'] + (
        str(solver['order']) if solver['sampler'] in ('dpm++', 'unipc') else ''
    )
    how = f"{name} {grid}, {steps} steps, cfg {cfg_scale}"
    kw = dict(
        cfg_scale=cfg_scale,
        autocast=autocast,
        batch_size=batch_size,
        steps=steps,
        control_scale=control_scale,
        **solver,
    )

    def generate(names, seed_, start=None):
        """Images for a list of prompts (text model) or class indices, one image each; with hints,
        image i gets hint start + i (start None: no hint)."""
        h = (
            None
            if hints is None or start is None
            else hints[(start + torch.arange(len(names), device=dev)) % len(hints)]
        )
        if not is_text:
            return sample_images(
                model, diffusion, torch.tensor(names, device=dev), meta, seed=seed_, hint=h, **kw
            )
        cond, empty = encode_prompts(names, meta, dev)
        labels = torch.zeros(len(names), dtype=torch.long, device=dev)
        return sample_images(
            model, diffusion, labels, meta, seed=seed_, text=cond, null_text=empty, hint=h, **kw
        )

    is_shapes = meta.get('dataset') == 'shapes'
    if grade and not is_shapes:
        raise SystemExit("error: --grade=True needs a model trained on the built-in 'shapes' data")
    # read first: a missing one fails before any sampling
    reference = shapes_reference(data) if grade else None

    # single images for metrics.py, instead of the grid (a grid of thousands helps no one)
    if save_dir:
        # the prompts in turn; a shapes caption ("a red circle") is also that class
        if is_text:
            found = read_prompts(argv, prompts, data)
            asked = [found[i % len(found)] for i in range(num_samples)]
            from shapes import CLASS_NAMES, shape_caption

            caption_class = (
                {shape_caption(c): c for c in range(len(CLASS_NAMES))} if is_shapes else {}
            )
            labels = [caption_class.get(p, -1) for p in asked]
        # the classes in turn (balanced); an unconditional model: the null label, -1 in samples.json
        else:
            asked = [
                i % meta['num_classes'] if meta['num_classes'] else 0 for i in range(num_samples)
            ]
            labels = asked if meta['num_classes'] else [-1] * num_samples
        info = dict(checkpoint=os.path.join(out_dir, ckpt_name), sampler=how, seed=seed)
        path = save_samples(generate, asked, labels, meta, save_dir, info)
        print(f"wrote {num_samples} images and {path} ({how}, seed {seed})")
    else:
        if is_text:
            names = [p for p in read_prompts(argv, prompts, data) for _ in range(per_class)]
            images = generate(names, seed, 0)
        else:
            labels = class_labels(meta, per_class).tolist()
            images = generate(labels, seed, 0)
            names = [meta['class_names'][i] if meta['num_classes'] else '' for i in labels]
        n = len(images)
        if hints is not None:
            images, names = with_hints(images, names, hints, ncol)
        path = os.path.join(out_dir, 'grid.png')
        save_grid(images, names, path, ncol=ncol)
        print(
            f"wrote {path} ({n} images{', hints in the first row' if hints is not None else ''}, {how}, seed {seed})"
        )

    if grade:
        from shapes import factor_fd, grade as grade_images, shape_caption

        labels = torch.arange(meta['num_classes']).repeat_interleave(grade_per_class)
        # a text model is graded on the prompts "a red circle", ... (the shapes captions)
        images = generate(
            [shape_caption(i) for i in labels.tolist()] if is_text else labels.tolist(), seed + 1
        ).numpy()
        acc, per_class_acc = grade_images(images, labels.numpy())
        fd = factor_fd(images, labels.numpy(), *reference)
        n_read, n_real = sum(fd['n'].values()), sum(fd['n_ref'].values())
        undefined = '' if math.isfinite(fd['overall']) else ' (a class has < 2 readable samples)'
        print(
            f"conditional accuracy ({'text prompts' if is_text else 'class labels'}; shape and colour read back "
            f"right): {100 * acc:.1f}% of {len(labels)} samples | {how}"
        )
        print(
            f"factor FD (size, x, y, background vs the real images of {data} val; mean over {len(fd['per_class'])} "
            f"classes; 0 = the same distribution): {fd['overall']:.4f}{undefined} | {n_read} of {len(labels)} "
            f"samples readable, {n_real} real"
        )
        per = [
            f"{name} {100 * a:.0f}% {fd['per_class'][c]:.2g}"
            for c, (name, a) in enumerate(zip(meta['class_names'], per_class_acc))
        ]
        print('per class (accuracy, factor FD): ' + ', '.join(per))


if __name__ == '__main__':
    main()
