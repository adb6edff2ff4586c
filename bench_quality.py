"""
bench_samplers.py --quality=<a shapes checkpoint folder>: the samplers on a trained model, where the
error is not known but its effect is measured: conditional accuracy and factor FD (shapes.py) per
sampler and NFE, the same noise in every cell, and our default solver tuned to the checkpoint.
"""

import os
import sys
import time

import torch

from checkpoint import load_model
from fitted import CHECK
from images import sample_images, shapes_reference
from model import input_shape, setup_device
from samplers import default_solver, guided, solver_name, tune_solver
from shapes import factor_fd, grade


def quality_table(ckpt_dir, cfg_scale, per_class, nfes, tune_max_steps, tune_iters, seed, device):
    """A trained shapes model, per sampler and NFE: conditional accuracy and factor FD (shapes.py)
    of per_class samples per class, the same noise in every cell; and our default solver tuned to
    the checkpoint (on other noise, as sample.py --tune=True does) up to tune_max_steps, with
    tune_iters gradient steps. The last row: 1000 ancestral steps, for scale."""
    dev = setup_device(device, 'float32')[0]
    model, diffusion, meta, config = load_model(os.path.join(ckpt_dir, 'ckpt.pt'), dev)
    if meta.get('dataset') != 'shapes' or model.config.text_dim:
        sys.exit(
            f"error: --quality={ckpt_dir} must be a class-conditional model of the built-in shapes "
            "data"
        )
    reference = shapes_reference(config['data_dir'])
    labels = torch.arange(meta['num_classes']).repeat_interleave(per_class).to(dev)
    d = default_solver(diffusion.objective, 10)
    default = (d['sampler'], d['order'], None)
    configs = [default] + [
        c
        for c in [
            ('unipc', 2, 'flowtime'),
            ('dpm++', 2, 'flowtime'),
            ('dpm++', 1, 'flowtime'),
            ('dpm++', 2, 'logsnr'),
            ('unipc', 3, 'logsnr'),
        ]
        if c != default
    ]
    print(f"{len(labels)} samples per cell (accuracy % / factor FD), cfg {cfg_scale:g}, {ckpt_dir}")
    print(f"{'sampler':<24}" + ''.join(f"{f'{n} NFE':>15}" for n in nfes), flush=True)

    def cell(steps, **solver):
        x = sample_images(
            model, diffusion, labels, meta, cfg_scale, seed=seed, steps=steps, **solver
        ).numpy()
        y = labels.cpu().numpy()
        return f"{100 * grade(x, y)[0]:6.1f}% {factor_fd(x, y, *reference)['overall']:.4f}"

    for sampler, order, spacing in configs:
        cells = [cell(n, sampler=sampler, order=order, spacing=spacing) for n in nfes]
        name = solver_name(sampler, order, spacing)
        name += ' (default)' if (sampler, order, spacing) == default else ''
        print(f"{name:<24}" + ''.join(f"{c:>15}" for c in cells), flush=True)
    # the fit's noise: not the cells'
    g = torch.Generator(dev).manual_seed(seed + 1_000_003)
    tune_labels = torch.arange(meta['num_classes'], device=dev).repeat(4)
    shape = (len(tune_labels),) + tuple(input_shape(meta))
    # the noise its iterate is selected on, and that it is checked on (fitted.CHECK batches)
    x_tune, x_val = (torch.randn(shape, generator=g, device=dev) for _ in range(2))
    x_check = torch.randn((CHECK * shape[0],) + shape[1:], generator=g, device=dev)
    model_fn = guided(
        model.requires_grad_(False), diffusion, tune_labels, meta['num_classes'], cfg_scale
    )
    cells = []
    for n in nfes:
        if n > tune_max_steps:
            cells.append('-')
            continue
        t0, d = time.time(), default_solver(diffusion.objective, n)
        solver = (d['sampler'], d['order'], d['spacing'])
        matrix, _ = tune_solver(
            model_fn, x_tune, x_val, diffusion, n, *solver, iters=tune_iters, x_check=x_check
        )
        cells.append(cell(n, spacing=d['spacing'], matrix=matrix))
        # kept if cut short
        print(f"  (tuned the {n}-step solver in {time.time() - t0:.0f} s: {cells[-1]})", flush=True)
    print(f"{solver_name(*default[:2], 'tuned solver'):<24}" + ''.join(f"{c:>15}" for c in cells))
    print(f"{'ddpm flowtime, 1000 NFE':<24}{cell(1000, sampler='ddpm', spacing='flowtime'):>15}")
