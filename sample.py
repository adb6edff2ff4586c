"""
Sample from a trained checkpoint with classifier-free guidance, write a PNG grid:

    python sample.py --out_dir=out-shapes                    # grid of every class -> out-shapes/grid.png
    python sample.py --out_dir=out-shapes --grade=True       # shapes only: read samples back, print accuracy, factor FD
    python sample.py --out_dir=out-shapes --save_dir=samples --num_samples=5000   # PNGs + samples.json, for metrics.py
    python sample.py --out_dir=out-shapes --sampler=ddpm --steps=1000 --spacing=linspace
    python sample.py --out_dir=out-emoji --prompt="red heart" --prompt="grinning face"   # text models
    python sample.py --out_dir=out-emoji --prompts=prompts.txt                          # one prompt per line

Samplers (all in sample_loop, on the alpha/sigma of model.Diffusion): DPM-Solver++ 1/2/3 (Lu et al. 2022,
the default: 2M), DDIM (Song et al. 2021, eta >= 0), DDPM ancestral (Ho et al. 2020), Euler/Heun for
flow models. CFG: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022). Each is checked against
diffusers' scheduler of the same name in tests/test_sampler.py.
"""
import functools
import json
import math
import os
import sys
import textwrap
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from checkpoint import atomic_write, load_model
from configurator import check
from model import input_shape, setup_device

# -----------------------------------------------------------------------------
out_dir = 'out'              # where the checkpoint is, and where the grid goes
ckpt_name = 'ckpt.pt'        # or 'best.pt', or 'model.safetensors' (the shareable export: EMA weights)
steps = 20                   # solver steps; NFE = steps (heun: 2*steps-1); CFG's cond+uncond is one batched call
sampler = 'dpm++'            # 'dpm++', 'ddim', 'ddpm', 'euler', 'heun' (the last two: flow models)
order = 2                    # dpm++ order: 1, 2 or 3
spacing = 'logsnr'           # step times: 'logsnr', 'karras', or time-uniform 'linspace', 'leading', 'trailing'
eta = 0.0                    # ddim: 0 = deterministic, 1 = DDPM
threshold = 0.0              # Imagen dynamic thresholding quantile of |x0| (e.g. 0.995); 0 = off
threshold_max = 1.0
cfg_scale = 4.0              # 1 = no guidance
per_class = 8                # grid: images per class or prompt (unconditional models: per_class * 8 images)
prompt = ''                  # text models: --prompt="a red circle", repeatable (default: the dataset's val captions);
                             # read from the command line by read_prompts: every --prompt=... counts
prompts = ''                 # text models: a text file, one prompt per line
grade = False                # shapes only: sample grade_per_class images per class and read them back
grade_per_class = 40
data_dir = ''                # --grade's real images (the val split) and default prompts; '' = the model's dataset
save_dir = ''                # instead of the grid: num_samples PNGs + samples.json here (what metrics.py reads)
num_samples = 0              # with save_dir: the classes (or prompts) in turn, deterministic from seed
batch_size = 256
use_ema = True
seed = 0
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------
SAMPLERS = ('dpm++', 'ddim', 'ddpm', 'euler', 'heun')
SPACINGS = ('logsnr', 'karras', 'linspace', 'leading', 'trailing')


def check_config():
    """What each setting may be, in one place: a bad value is one line before the checkpoint is even read."""
    check(globals(), positive=('steps', 'per_class', 'grade_per_class', 'batch_size'),
          non_negative=('eta', 'cfg_scale', 'seed'), fraction=('threshold',),
          choices=dict(sampler=SAMPLERS, order=(1, 2, 3), spacing=SPACINGS, dtype=('auto', 'float32', 'bfloat16', 'float16')))
    if threshold_max < 1:
        sys.exit(f"error: --threshold_max={threshold_max} must be >= 1")
    if num_samples < 0 or bool(save_dir) != (num_samples > 0):
        sys.exit(f"error: --save_dir={save_dir!r} and --num_samples={num_samples} go together: a folder, a count > 0")


def threshold_x0(x0, ratio, max_value=1.0):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = the `ratio` quantile
    of |x0| (at least 1, at most max_value); clip x0 to [-s, s] and divide by s. For pixel-space models
    with strong guidance; off (ratio 0) by default."""
    s = x0.flatten(1).abs().float().quantile(ratio, dim=1).clamp(1, max_value).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return x0.clamp(-s, s) / s


def sample_loop(model_fn, x, diffusion, steps, sampler='dpm++', order=2, spacing='logsnr', eta=0.0,
                threshold=0.0, threshold_max=1.0, generator=None):
    """Integrate from noise x to data in `steps` steps. model_fn(x, t) returns the network output at
    objective time t (CFG already applied: one batched call). Returns (x, nfe).
      dpm++: DPM-Solver++ multistep, order 1-3 (Lu et al. 2022), data-prediction form
      ddim:  DDIM (Song et al. 2021); eta=0 deterministic, eta=1 is DDPM's ancestral sampler
      ddpm:  = ddim with eta=1
      euler, heun: the flow ODE dx/dt = v in t (flow objective only; heun uses 2 NFE per step but the last)"""
    ts, alphas, sigmas = diffusion.sampling_schedule(steps, spacing)
    A, S = alphas.tolist(), sigmas.tolist()
    nfe = 0

    def x0_at(x, i):
        nonlocal nfe
        nfe += 1
        x0 = diffusion.to_x0(model_fn(x, ts[i].item()), x, A[i], S[i])
        return threshold_x0(x0, threshold, threshold_max) if threshold else x0

    if sampler == 'dpm++':
        lam = (alphas.log() - sigmas.log()).tolist()  # log-SNR/2: -inf at pure noise, +inf when clean
        hist = []  # data predictions of the last steps, newest last
        for i in range(steps):
            hist = (hist + [x0_at(x, i)])[-3:]
            # warm up from first order; the step to sigma=0 is first order and, in short runs, the one
            # before it at most second (as in diffusers: fewer, larger steps make extrapolation unstable)
            k = min(order, len(hist), 1 if i == steps - 1 else 2 if i == steps - 2 and steps < 15 else 3)
            h = lam[i + 1] - lam[i]
            phi = np.expm1(-h)  # exp(-h) - 1
            D0 = hist[-1]
            x = (S[i + 1] / S[i]) * x - A[i + 1] * phi * D0  # exact for a constant D: DDIM
            if k >= 2:  # + the linear term of D in lambda (2M: eq. 9 of DPM-Solver++)
                r0 = (lam[i] - lam[i - 1]) / h
                D1 = (D0 - hist[-2]) / r0
                if k == 2:
                    x = x - 0.5 * A[i + 1] * phi * D1
                else:  # 3M: a quadratic in lambda through the last three predictions
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    D1_1 = (hist[-2] - hist[-3]) / r1
                    D2 = (D1 - D1_1) / (r0 + r1)
                    D1 = D1 + r0 / (r0 + r1) * (D1 - D1_1)
                    x = x + A[i + 1] * (phi / h + 1) * D1 - A[i + 1] * ((phi + h) / h ** 2 - 0.5) * D2
    elif sampler in ('ddim', 'ddpm'):
        eta = 1.0 if sampler == 'ddpm' else eta
        for i in range(steps):
            a, s, a_n, s_n = A[i], S[i], A[i + 1], S[i + 1]
            x0 = x0_at(x, i)
            eps = (x - a * x0) / s
            # variance of the posterior q(x_next | x, x0), scaled by eta^2 (DDIM eq. 16 in alpha/sigma form)
            var = eta ** 2 * (s_n / s) ** 2 * (s ** 2 - (a / a_n) ** 2 * s_n ** 2) if s_n > 0 else 0.0
            x = a_n * x0 + max(s_n ** 2 - var, 0.0) ** 0.5 * eps
            if var > 0:
                x = x + var ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif sampler in ('euler', 'heun'):
        if diffusion.objective != 'flow':
            raise SystemExit(f"error: sampler {sampler!r} integrates the flow ODE in t: use it with objective='flow'")
        for i in range(steps):
            t, t_n = S[i], S[i + 1]  # flow: sigma = t
            v = (x - x0_at(x, i)) / t
            x_next = x + (t_n - t) * v
            if sampler == 'heun' and t_n > 0:  # trapezoid: average with the slope at the Euler end point
                v_n = (x_next - x0_at(x_next, i + 1)) / t_n
                x_next = x + (t_n - t) * 0.5 * (v + v_n)
            x = x_next
    else:
        raise SystemExit(f"error: unknown sampler {sampler!r}: use dpm++, ddim, ddpm, euler or heun")
    return x, nfe


def guided(model, diffusion, y, null_class, cfg_scale, text=None, null_text=None):
    """The network with classifier-free guidance: out = uncond + s * (cond - uncond), with the conditional and
    unconditional halves in one batched forward (one network evaluation per step). A text model: text =
    the prompts' (states, mask, pooled), one per image; null_text = the empty caption's, which is the
    unconditional half (y is then the null class throughout)."""
    use_cfg = cfg_scale != 1 and (null_class > 0 or text is not None)  # unconditional: nothing to guide with
    if use_cfg:
        y = torch.cat([y, torch.full_like(y, null_class)])
        if text is not None:
            text = tuple(torch.cat([a, e.expand_as(a)]) for a, e in zip(text, null_text))

    def model_fn(x, t):
        xx = torch.cat([x, x]) if use_cfg else x
        tt = torch.full((len(xx),), diffusion.model_time(t), device=x.device)
        out = model(xx, tt, y, text).float()
        if not use_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return model_fn


@torch.inference_mode()
def sample_images(model, diffusion, labels, meta, cfg_scale, seed=0, autocast=None, batch_size=256, text=None,
                  null_text=None, **solver):
    """Generate one image per label; returns uint8 [N, 3, H, W]. Seeded: the same call gives the same
    images. solver: steps, sampler, order, spacing, eta, threshold, threshold_max (see sample_loop).
    A text model: text = (states, mask, pooled) per image, null_text = the empty caption's (see guided).
    A latent model's samples are decoded with the VAE that prepare.py recorded in meta."""
    if model.config.text_dim and (text is None or null_text is None):  # it would sample unconditioned, silently
        raise SystemExit("error: this is a text model: give it prompts (text=, null_text=: see encode_prompts)")
    vae = load_vae(meta, labels.device)
    shape = input_shape(meta)
    g = torch.Generator(labels.device).manual_seed(seed)
    noise = torch.randn((len(labels),) + shape, generator=g, device=labels.device)
    out = []
    for i in range(0, len(labels), batch_size):
        part = None if text is None else tuple(a[i:i + batch_size] for a in text)
        model_fn = guided(model, diffusion, labels[i:i + batch_size], model.config.num_classes, cfg_scale, part, null_text)
        with autocast or nullcontext():
            x, _ = sample_loop(model_fn, noise[i:i + batch_size], diffusion, generator=g, **solver)
        if not torch.isfinite(x).all():
            raise SystemExit("error: sampling produced NaN/inf: the checkpoint's weights are broken (check the training loss)")
        if vae is not None:
            x = vae.decode(vae.from_latent(x.float()))  # tiled automatically above the VAE's tile size
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
    """per_class labels of every class, class by class; an unconditional model gets 8 rows of null labels."""
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
        tile = Image.fromarray(img.permute(1, 2, 0).numpy().squeeze()).resize((tw, th), Image.NEAREST)
        grid.paste(tile, (x, y + cap_h))
        top = y + cap_h - 11 * len(lines[i]) - 2  # bottom-aligned: each caption sits right on its image
        draw.multiline_text((x + 1, top), '\n'.join(lines[i]), fill='black', font=font, spacing=1)
    atomic_write(path, lambda f: grid.save(f, format='PNG'))


def save_samples(generate, asked, labels, meta, folder, info):
    """One PNG per entry of `asked` (class indices or prompts) in `folder`, 000000.png, ..., sampled batch_size at a
    time (batch k from seed * 1_000_003 + k: the same command writes the same bytes, and a longer run starts with
    the same images), then folder/samples.json, atomically and last: when it exists, every file it names is
    complete. labels: the class each image was asked for, -1 for none (a prompt that is no class, unconditional)."""
    manifest = os.path.join(folder, 'samples.json')
    files = []
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(manifest):
            os.remove(manifest)  # until the new one is written, no manifest names a mix of old and new files
        with tqdm(total=len(asked), unit='img', desc=f'sampling to {folder}') as bar:
            for k, start in enumerate(range(0, len(asked), batch_size)):
                for img in generate(asked[start:start + batch_size], seed * 1_000_003 + k):
                    files.append(f"{len(files):06d}.png")
                    Image.fromarray(img.permute(1, 2, 0).numpy().squeeze()).save(os.path.join(folder, files[-1]))
                bar.update(min(batch_size, len(asked) - start))
    except OSError as e:
        raise SystemExit(f"error: cannot write samples to '{folder}' ({e.strerror or e})") from None
    names = meta.get('class_names') or []
    doc = dict(files=files, labels=labels, classes=[names[y] if y >= 0 else '' for y in labels],
               prompts=[a if isinstance(a, str) else '' for a in asked], **info)
    text = '{\n' + ',\n'.join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in doc.items()) + '\n}\n'
    atomic_write(manifest, lambda f: f.write(text.encode('utf-8')))  # one key a line: readable at any N
    return manifest


def shapes_reference(folder):
    """The real images --grade compares samples with: (factors [N, 4], labels) of the val split of a shapes
    dataset (read back by shapes.factor_matrix, exactly as the samples are, so the reader's biases cancel)."""
    from data import Data
    from shapes import factor_matrix
    val = Data(folder, 'val', torch.device('cpu'))  # checked against meta.json: a bad split is one line
    return factor_matrix(val.x), val.y


def read_prompts(argv, path, data_dir):
    """The prompts for a text model: every --prompt=... in argv (the flag repeats), then the lines of
    `path`; if there are none, the first 8 distinct captions of the dataset's val split."""
    found = [a.split('=', 1)[1] for a in argv if a.startswith('--prompt=')]
    if path:
        try:
            with open(path, encoding='utf-8') as f:
                found += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read --prompts file '{path}' ({getattr(e, 'strerror', None) or e})")
        if not found:
            raise SystemExit(f"error: --prompts file '{path}' has no prompts (one per line)")
    if not found:
        try:
            found = list(val_captions(data_dir))
        except OSError:
            raise SystemExit("error: a text model needs prompts: pass --prompt=\"...\" or --prompts=file.txt") from None
    return found


def val_captions(data_dir, n=8):
    """The first n distinct non-empty captions of a dataset's val split -> {caption: its first index}."""
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
    """Encode prompts with the text encoder that prepare.py recorded in meta (loaded once per process)
    -> (cond, empty caption), each (states, mask, pooled)."""
    from prepare import encode_texts
    tokenizer, encoder = _text_encoder(meta['text_encoder'], str(dev))
    distinct = list(dict.fromkeys(texts))  # each prompt encoded once, however often it repeats
    states, mask, pooled = encode_texts(distinct + [''], tokenizer, encoder, meta['text_max_len'], dev)
    # through fp16, as the training captions were stored: the model sees the values it was trained on
    states, pooled = states.half().float(), pooled.half().float()
    pos = {t: i for i, t in enumerate(distinct)}
    idx = torch.tensor([pos[t] for t in texts], device=states.device)
    return (states[idx], mask[idx], pooled[idx]), (states[-1:], mask[-1:], pooled[-1:])


def main():
    from configurator import configure
    argv = sys.argv[1:]
    configure(globals(), [a for a in argv if not a.startswith('--prompt=')])  # repeatable: read below
    check_config()
    dev, _, autocast = setup_device(device, dtype)
    model, diffusion, meta, train_config = load_model(os.path.join(out_dir, ckpt_name), dev, use_ema)
    kw = dict(cfg_scale=cfg_scale, autocast=autocast, batch_size=batch_size, steps=steps, sampler=sampler, order=order,
              spacing=spacing, eta=eta, threshold=threshold, threshold_max=threshold_max)
    how = f"{sampler}{order if sampler == 'dpm++' else ''} {spacing}, {steps} steps, cfg {cfg_scale}"
    is_text = bool(model.config.text_dim)
    if (prompts or any(a.startswith('--prompt=') for a in argv)) and not is_text:
        raise SystemExit(f"error: {out_dir}/{ckpt_name} is not a text model (it was trained on class labels): drop --prompt")

    def generate(names, seed_):
        """Images for a list of prompts (text model) or class indices, one image each."""
        if not is_text:
            return sample_images(model, diffusion, torch.tensor(names, device=dev), meta, seed=seed_, **kw)
        cond, empty = encode_prompts(names, meta, dev)
        labels = torch.zeros(len(names), dtype=torch.long, device=dev)
        return sample_images(model, diffusion, labels, meta, seed=seed_, text=cond, null_text=empty, **kw)

    data = data_dir or train_config.get('data_dir', '')
    is_shapes = meta.get('dataset') == 'shapes'
    if grade and not is_shapes:
        raise SystemExit("error: --grade=True needs a model trained on the built-in 'shapes' data")
    reference = shapes_reference(data) if grade else None  # read first: a missing one fails before any sampling

    if save_dir:  # single images for metrics.py, instead of the grid (a grid of thousands helps no one)
        if is_text:  # the prompts in turn; a shapes caption ("a red circle") is also that class
            found = read_prompts(argv, prompts, data)
            asked = [found[i % len(found)] for i in range(num_samples)]
            from shapes import CLASS_NAMES, shape_caption
            caption_class = {shape_caption(c): c for c in range(len(CLASS_NAMES))} if is_shapes else {}
            labels = [caption_class.get(p, -1) for p in asked]
        else:  # the classes in turn (balanced); an unconditional model: the null label, -1 in samples.json
            asked = [i % meta['num_classes'] if meta['num_classes'] else 0 for i in range(num_samples)]
            labels = asked if meta['num_classes'] else [-1] * num_samples
        info = dict(checkpoint=os.path.join(out_dir, ckpt_name), sampler=how, seed=seed)
        path = save_samples(generate, asked, labels, meta, save_dir, info)
        print(f"wrote {num_samples} images and {path} ({how}, seed {seed})")
    else:
        if is_text:
            names = [p for p in read_prompts(argv, prompts, data) for _ in range(per_class)]
            images = generate(names, seed)
        else:
            labels = class_labels(meta, per_class).tolist()
            images = generate(labels, seed)
            names = [meta['class_names'][i] if meta['num_classes'] else '' for i in labels]
        path = os.path.join(out_dir, 'grid.png')
        save_grid(images, names, path, ncol=per_class if (meta['num_classes'] or is_text) else 8)
        print(f"wrote {path} ({len(images)} images, {how}, seed {seed})")

    if grade:
        from shapes import factor_fd, grade as grade_images, shape_caption
        labels = torch.arange(meta['num_classes']).repeat_interleave(grade_per_class)
        # a text model is graded on the prompts "a red circle", ... (the shapes captions)
        images = generate([shape_caption(i) for i in labels.tolist()] if is_text else labels.tolist(), seed + 1).numpy()
        acc, per_class_acc = grade_images(images, labels.numpy())
        fd = factor_fd(images, labels.numpy(), *reference)
        n_read, n_real = sum(fd['n'].values()), sum(fd['n_ref'].values())
        undefined = '' if math.isfinite(fd['overall']) else ' (a class has < 2 readable samples)'
        print(f"conditional accuracy ({'text prompts' if is_text else 'class labels'}; shape and colour read back "
              f"right): {100 * acc:.1f}% of {len(labels)} samples | {how}")
        print(f"factor FD (size, x, y, background vs the real images of {data} val; mean over {len(fd['per_class'])} "
              f"classes; 0 = the same distribution): {fd['overall']:.4f}{undefined} | {n_read} of {len(labels)} "
              f"samples readable, {n_real} real")
        per = [f"{name} {100 * a:.0f}% {fd['per_class'][c]:.2g}"
               for c, (name, a) in enumerate(zip(meta['class_names'], per_class_acc))]
        print('per class (accuracy, factor FD): ' + ', '.join(per))


if __name__ == '__main__':
    main()
