"""
Sample from a trained checkpoint with DPM-Solver++ and classifier-free guidance, write a PNG grid:

    python sample.py --out_dir=out-shapes                    # grid of every class -> out-shapes/grid.png
    python sample.py --out_dir=out-shapes --grade=True       # shapes only: read samples back, print accuracy

DPM-Solver++: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (2022), multistep second order (2M), data-prediction form.
CFG: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022).
"""
import os
import textwrap
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from model import Diffusion, build_model, setup_device

# -----------------------------------------------------------------------------
out_dir = 'out'              # where the checkpoint is, and where the grid goes
ckpt_name = 'ckpt.pt'
steps = 20                   # solver steps = network evaluations (cond + uncond are one batched call)
order = 2                    # DPM-Solver++ order: 1 (= DDIM) or 2 (2M)
cfg_scale = 4.0              # 1 = no guidance
per_class = 8                # grid: images per class (unconditional models: per_class * 8 images)
grade = False                # shapes only: sample grade_per_class images per class and read them back
grade_per_class = 40
batch_size = 256
use_ema = True
seed = 0
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------


def dpm_solver_pp(model_fn, x, diffusion, steps, order=2):
    """Integrate the probability-flow ODE from noise x to data. model_fn(x, t) returns the network output
    at objective time t; diffusion.to_x0 turns it into a data prediction D. With lambda = log(alpha/sigma)
    and h = lambda_next - lambda, the exact solution of the ODE for a constant D is
        x_next = (sigma_next / sigma) * x - alpha_next * (exp(-h) - 1) * D          (first order, = DDIM)
    2M replaces D by a linear extrapolation from the previous step's prediction (DPM-Solver++ eq. 9).
    The first step has no history and the last step (to sigma = 0) is first order: more stable, and it
    returns exactly the final data prediction."""
    ts, alphas, sigmas = diffusion.sampling_schedule(steps)
    lambdas = alphas.log() - sigmas.log()  # -inf at pure noise (alpha = 0), +inf at clean data (sigma = 0)
    x0_prev = None
    for i in range(steps):
        x0 = diffusion.to_x0(model_fn(x, ts[i].item()), x, alphas[i].item(), sigmas[i].item())
        h = (lambdas[i + 1] - lambdas[i]).item()
        if order == 1 or x0_prev is None or i == steps - 1:
            D = x0
        else:
            r = (lambdas[i] - lambdas[i - 1]).item() / h
            D = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sigmas[i + 1] / sigmas[i]).item() * x - alphas[i + 1].item() * (np.exp(-h) - 1) * D
        x0_prev = x0
    return x


def guided(model, diffusion, y, null_class, cfg_scale):
    """The network with classifier-free guidance: out = uncond + s * (cond - uncond), with the conditional and
    unconditional halves in one batched forward (one network evaluation per step)."""
    def model_fn(x, t):
        use_cfg = cfg_scale != 1 and null_class > 0  # an unconditional model has nothing to guide with
        xx, yy = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_class)])) if use_cfg else (x, y)
        tt = torch.full((len(xx),), diffusion.model_time(t), device=x.device)
        out = model(xx, tt, yy).float()
        if not use_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return model_fn


@torch.inference_mode()
def sample_images(model, diffusion, labels, meta, steps, cfg_scale, seed=0, order=2, autocast=None, batch_size=256):
    """Generate one image per label; returns uint8 [N, C, H, W]. Seeded: the same call gives the same images."""
    shape = (meta['channels'], meta['resolution'], meta['resolution'])
    g = torch.Generator(labels.device).manual_seed(seed)
    noise = torch.randn((len(labels),) + shape, generator=g, device=labels.device)
    out = []
    for i in range(0, len(labels), batch_size):
        model_fn = guided(model, diffusion, labels[i:i + batch_size], meta['num_classes'], cfg_scale)
        with autocast or nullcontext():
            x = dpm_solver_pp(model_fn, noise[i:i + batch_size], diffusion, steps, order)
        if not torch.isfinite(x).all():
            raise SystemExit("error: sampling produced NaN/inf: the checkpoint's weights are broken (check the training loss)")
        out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


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
        draw.multiline_text((x + 1, y + 1), '\n'.join(lines[i]), fill='black', font=font, spacing=1)
    tmp = path + '.tmp.png'
    grid.save(tmp)
    os.replace(tmp, path)


def load_model(path, dev, use_ema=True):
    """Rebuild the DiT from a train.py checkpoint; returns (model, diffusion, meta, config)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}: train first, or pass --out_dir=<the training out_dir>")
    ckpt = torch.load(path, map_location=dev, weights_only=False)
    model = build_model(ckpt['model_args'])
    model.load_state_dict(ckpt['ema' if use_ema else 'model'])
    c = ckpt['config']
    diffusion = Diffusion(c['objective'], c['schedule'], c['prediction'], c['num_timesteps'])
    return model.to(dev).eval(), diffusion, ckpt['meta'], c


def main():
    from configurator import configure
    configure(globals())
    dev, _, autocast = setup_device(device, dtype)
    model, diffusion, meta, _ = load_model(os.path.join(out_dir, ckpt_name), dev, use_ema)
    kw = dict(steps=steps, cfg_scale=cfg_scale, order=order, autocast=autocast, batch_size=batch_size)

    labels = class_labels(meta, per_class).to(dev)
    images = sample_images(model, diffusion, labels, meta, seed=seed, **kw)
    names = [meta['class_names'][i] if meta['num_classes'] else '' for i in labels.tolist()]
    path = os.path.join(out_dir, 'grid.png')
    save_grid(images, names, path, ncol=per_class if meta['num_classes'] else 8)
    print(f"wrote {path} ({len(images)} images, {steps} steps, cfg {cfg_scale}, seed {seed})")

    if grade:
        if meta.get('dataset') != 'shapes':
            raise SystemExit("error: --grade=True needs a model trained on the built-in 'shapes' data")
        from prepare import grade as grade_images
        labels = torch.arange(meta['num_classes']).repeat_interleave(grade_per_class).to(dev)
        images = sample_images(model, diffusion, labels, meta, seed=seed + 1, **kw)
        acc, per_class_acc = grade_images(images.numpy(), labels.cpu().numpy())
        print(f"conditional accuracy (shape and colour read back right): {100 * acc:.1f}% of {len(labels)} samples "
              f"| DPM-Solver++({order}M) {steps} steps, cfg {cfg_scale}")
        print('per class: ' + ', '.join(f"{n} {100 * a:.0f}%" for n, a in zip(meta['class_names'], per_class_acc)))


if __name__ == '__main__':
    main()
