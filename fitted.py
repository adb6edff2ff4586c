"""
Solvers fitted to a checkpoint (sample.py --tune=True): fitted on one batch of noise, the best
iterate selected on a second and checked against the untuned solver on a third (samplers.tune_solver
keeps a fit only where it wins there, fit_verdict), and kept in
out_dir/grids.json with the digest of the weights they were fitted to, so that a fit is used for
those weights only: not for best.pt, a student, or the same ckpt.pt after more training.

    python sample.py --out_dir=out-shapes --steps=5 --tune=True
"""

import hashlib
import json
import os
import time

import torch

from checkpoint import atomic_write
from samplers import guided, tune_solver

# the check batch, in fit batches: a fit that sends 1 sample in 500 to another mode is seen
CHECK = 4


def weights_digest(model):
    """What identifies the weights sampled: the sha256 of every tensor's name, dtype, shape and
    bytes, in state_dict order (16 hex digits)."""
    h = hashlib.sha256()
    for name, v in model.state_dict().items():
        h.update(f"{name} {v.dtype} {tuple(v.shape)}".encode())
        if v.numel():
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_grids(folder):
    """folder/grids.json: the solvers fitted to the checkpoints there ({key: {'t': [times],
    'matrix': [[...]] or None, 'weights': digest, ...}}); {} if none."""
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


def fit_for(grids, key, digest, where):
    """grids.json's fit for key, if it was made for these weights (digest) and beat the untuned
    solver on its held-out noise; else None, with one line saying why and how to refit."""
    fit = grids.get(key)
    if fit is None:
        return None
    if fit.get('weights') != digest:
        print(
            f"{where}/grids.json's {key} fit is for other weights: sampling with the untuned "
            "solver (refit with --tune=True)"
        )
        return None
    if not fit.get('matrix'):
        print(
            f"{where}/grids.json's {key} fit did not beat the untuned solver on held-out noise: "
            "sampling with the untuned solver"
        )
        return None
    return fit


def tune_and_save(model, diffusion, labels, text, null_text, shape, solver, key, grids, args):
    """Fit the solver to these weights (samplers.tune_solver) for the conditions (labels, text,
    null_text) at args' cfg_scale, on len(labels) noise samples, selected on as many others and
    checked on CHECK times as many more; record it in args' out_dir/grids.json (atomically) with the
    weights' digest, the untuned and fitted errors and the verdict. args:
    sample.py's settings (seed, steps, cfg_scale, tune_iters, out_dir, ckpt_name, autocast).
    -> the solver settings to sample with: the fit's, or none if it did not win."""
    dev = labels.device
    # noise that the samples are not drawn from: one batch to fit on, one to select the iterate on,
    # and a larger one to check it on (rare samples in another mode set the error: fit_verdict)
    g = torch.Generator(dev).manual_seed(args['seed'] + 1_000_003)
    x, x_val, x_check = (
        torch.randn((k * len(labels),) + shape, generator=g, device=dev) for k in (1, 1, CHECK)
    )
    model = model.requires_grad_(False)
    nc, w = model.config.num_classes, args['cfg_scale']
    model_fn = guided(
        model, diffusion, labels, nc, w, text, null_text, scale_input=model.config.guidance
    )
    t0 = time.time()
    steps, sampler, order, spacing = (
        args['steps'],
        solver['sampler'],
        solver['order'],
        solver['spacing'],
    )
    with args['autocast']:
        matrix, info = tune_solver(
            model_fn,
            x,
            x_val,
            diffusion,
            steps,
            sampler,
            order,
            spacing,
            iters=args['tune_iters'],
            x_check=x_check,
        )
    verdict = 'kept' if info['used'] else 'the untuned solver is used'
    print(
        f"tuned {key}: RMS error vs a converged solve, untuned -> fitted: fit noise "
        f"{info['start_error']:.4f} -> {info['error']:.4f}, selection noise "
        f"{info['val_start_error']:.4f} -> {info['val_error']:.4f} ({len(labels)} samples each), "
        f"held-out noise {info['check_start_error']:.4f} -> {info['check_error']:.4f} "
        f"({len(x_check)} samples; {info['iters']} steps, {time.time() - t0:.0f} s): {verdict}: "
        f"{info['why']}"
    )
    t = diffusion.sampling_schedule(steps, spacing)[0].tolist()
    info.pop('val_errors')
    grids[key] = dict(
        t=t,
        matrix=matrix.tolist() if info['used'] else None,
        weights=weights_digest(model),
        checkpoint=args['ckpt_name'],
        batch=len(labels),
        **info,
    )
    text_out = json.dumps(grids, indent=1).encode('utf-8')
    atomic_write(os.path.join(args['out_dir'], 'grids.json'), lambda f: f.write(text_out))
    return dict(spacing=t, matrix=grids[key]['matrix']) if info['used'] else {}
