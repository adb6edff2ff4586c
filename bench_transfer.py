"""
Defaults that transfer across models, in the spirit of "Align Your Steps" (Sabour et al. 2024),
fitted once per objective and NFE over many Gaussian mixtures (bench_mixtures.py) and scored on the
held-out ones: a warp of the default solver's grid (--warp=True; not kept), and one solver matrix
(--shared=True; measured, not used by sample.py):

    python bench_samplers.py --mixtures=6 --warp=True
    python bench_samplers.py --mixtures=6 --shared=True --tune_iters=300
"""

import json
import math
import statistics

import torch

from bench_diffusers import diffusers_configs, run_diffusers
from bench_mixtures import (
    OBJECTIVES,
    exact_net,
    held_out_mixture,
    reference,
    rms,
    start,
    summary,
)
from diffusion import Diffusion
from samplers import default_solver, sample_loop, solver_matrix

# -----------------------------------------------------------------------------
# A transferable grid, in the spirit of "Align Your Steps" (Sabour et al. 2024): one warp of the
# default's grid per objective and NFE, chosen over training mixtures, scored on the held-out ones

WARPS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75)


def warped_grid(diffusion, steps, gamma):
    """The default's 'flowtime' grid u_i = 1 - i / steps warped to 1 - (i / steps)^gamma (gamma 1:
    the default; < 1: more steps at low noise), as times; None where vp's times would not
    decrease (u so close to 1 that the schedule's last step is reached twice)."""
    u = 1 - (torch.arange(steps, dtype=torch.float64) / steps) ** gamma
    t = u if diffusion.objective == 'flow' else diffusion.t_from_edm_sigma(u / (1 - u))
    t[0] = 1.0 if diffusion.objective == 'flow' else diffusion.T - 1.0
    t = t.tolist()
    return t if all(a > b for a, b in zip(t, t[1:])) else None


def warp_errors(name, mix, w, x, nfes, ref_steps):
    """{(nfe, gamma): RMS error} of UniPC-3 on each warped grid, one mixture and noise batch."""
    diffusion = Diffusion(*OBJECTIVES[name])
    alpha, sigma = start(diffusion)
    labels = torch.arange(len(x)) % (int(mix.labels.max()) + 1)
    ref = reference(x, alpha, sigma, mix, labels, w, ref_steps)
    net = exact_net(diffusion, mix, labels, w)
    errors = {}
    for n in nfes:
        for gamma in WARPS:
            t = warped_grid(diffusion, n, gamma)
            out = sample_loop(net, x, diffusion, n, 'unipc', 3, t)[0] if t else None
            errors[(n, gamma)] = rms(out, ref) if t else math.inf
    return errors


def batch(mix, num_samples, seed, which):
    """The which-th noise batch drawn from seed (score_mixture's: 0 fit, 1 check, 2 score)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(which + 1):
        x = torch.randn(num_samples, mix.mu.shape[1], generator=g, dtype=torch.float64)
    return x


def warp_table(mixtures, num_samples, nfes, ref_steps, seed=0):
    """Per objective and NFE, the warp with the lowest geometric mean of error / the default's over
    `mixtures` training mixtures (drawn from seed + 5000), and its error / the default's on the
    held-out mixtures' scoring batches (those of held_out): median and worst."""
    print(f"grid warp 1 - (i / steps)^gamma, gamma in {WARPS}, chosen on {mixtures} other mixtures")
    print(f"{'':<10}{'NFE':>4}  gamma  train: mean  worst  held out: median  worst (mix)")
    for name in OBJECTIVES:
        train, test = [], []
        for i in range(mixtures):
            mix, w, _ = held_out_mixture(i, seed + 5000)
            x = batch(mix, num_samples, seed + 9000 + i, 0)
            train.append(warp_errors(name, mix, w, x, nfes, ref_steps))
            mix, w, _ = held_out_mixture(i, seed)
            x = batch(mix, num_samples, seed + 2000 + i, 2)
            test.append(warp_errors(name, mix, w, x, nfes, ref_steps))
        for n in nfes:
            ratios = lambda errs, g: [e[(n, g)] / e[(n, 1.0)] for e in errs]
            mean = {g: statistics.geometric_mean(ratios(train, g)) for g in WARPS}
            best = min(mean, key=mean.get)
            held = ratios(test, best)
            worst = max(range(len(held)), key=lambda i: held[i])
            print(
                f"{name:<10}{n:>4}  {best:5.2f}  {mean[best]:11.2f}{max(ratios(train, best)):7.2f}"
                f"  {statistics.median(held):16.2f}{held[worst]:7.2f} (#{worst + 1})"
            )


# -----------------------------------------------------------------------------
# A transferable solver, "Align Your Steps" for the coefficients: one matrix per objective and NFE
# (the default solver's, as tune_solver fits it to one model) fitted over many training mixtures at
# once, its iterate selected on other mixtures, then scored on the held-out ones


def problems(name, count, seed, noise_seed, which, num_samples, ref_steps):
    """count (exact network, noise, reference end points) of the mixtures drawn from seed: the
    which-th noise batch of each (batch)."""
    diffusion = Diffusion(*OBJECTIVES[name])
    alpha, sigma = start(diffusion)
    out = []
    for i in range(count):
        mix, w, _ = held_out_mixture(i, seed)
        x = batch(mix, num_samples, noise_seed + i, which)
        labels = torch.arange(num_samples) % (int(mix.labels.max()) + 1)
        ref = reference(x, alpha, sigma, mix, labels, w, ref_steps)
        out.append((exact_net(diffusion, mix, labels, w), x, ref))
    return out


def fit_shared(diffusion, nfe, train, select, iters, lr=1e-3, beta=5.0):
    """The default solver's matrix (solver_matrix) fitted to every train problem at once. The loss
    is the mean over them of log(MSE / the untuned MSE), averaged with a soft maximum of the same
    (logsumexp(beta * .) / beta), so that no mixture is given up for the others. Adam with cosine
    decay, as tune_solver; every 25 steps the iterate is scored on the select problems, and the one
    whose worst error ratio there is lowest is kept (the untuned matrix, if none is below 1).
    -> (matrix, its worst ratio on select)."""
    d = default_solver(diffusion.objective, nfe)
    start_c = solver_matrix(diffusion, nfe, d['sampler'], d['order'], d['spacing'])
    mask = torch.ones_like(start_c).tril(1)

    def mse(p, matrix):
        out = sample_loop(p[0], p[1], diffusion, nfe, spacing=d['spacing'], matrix=matrix)[0]
        return (out - p[2]).pow(2).mean()

    with torch.no_grad():
        base = [mse(p, start_c) for p in train + select]
    base_train, base_select = base[: len(train)], base[len(train) :]
    C = start_c.clone().requires_grad_(True)
    opt = torch.optim.Adam([C], lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    best, best_worst = start_c, 1.0
    for i in range(iters + 1):
        if i % 25 == 0 and i:
            with torch.no_grad():
                worst = max(
                    (mse(p, C * mask) / b).sqrt().item() for p, b in zip(select, base_select)
                )
            if worst < best_worst:
                best, best_worst = (C * mask).detach().clone(), worst
        if i == iters:
            break
        logs = torch.stack([(mse(p, C * mask) / b).log() for p, b in zip(train, base_train)])
        loss = 0.5 * logs.mean() + 0.5 * torch.logsumexp(beta * logs, 0) / beta
        (C.grad,) = torch.autograd.grad(loss, C)
        torch.nn.utils.clip_grad_norm_([C], 1.0)
        opt.step()
        decay.step()
    return best, best_worst


def shared_table(
    mixtures, num_samples, nfes, ref_steps, iters, seed=0, train=24, peers=True, out=''
):
    """Per objective and NFE: the matrix fit_shared fits on `train` mixtures (drawn from seed +
    5000, their first noise batch), selected on as many others (seed + 6000), and scored on the
    `mixtures` held-out mixtures' scoring batches (held_out's): its error / the untuned default's
    and / the best diffusers configuration's, median and worst. out: a JSON file to write those
    that won on select to ({"objective nfe": {"t": times, "matrix": rows, "select_worst": ratio}}).
    -> {(objective, nfe): matrix}."""
    print(
        f"one solver matrix per objective and NFE fitted on {train} mixtures, selected on {train}"
        f" others, scored on {mixtures} held-out ({num_samples} noise samples each)"
    )
    cols = ('shared / untuned', 'shared / diffusers', 'untuned / diffusers')
    print(f"{'':<10}{'NFE':>4}  select" + ''.join(f"  {c:>19}" for c in cols))
    print(f"{'':<16}{'worst':>6}" + f"  {'median':>7}{'worst':>7} (mix)" * 3)
    table, saved = {}, {}
    for name in OBJECTIVES:
        diffusion = Diffusion(*OBJECTIVES[name])
        fit_on = problems(name, train, seed + 5000, seed + 9000, 0, num_samples, ref_steps)
        select = problems(name, train, seed + 6000, seed + 9500, 0, num_samples, ref_steps)
        test = problems(name, mixtures, seed, seed + 2000, 2, num_samples, ref_steps)
        configs = diffusers_configs(*OBJECTIVES[name]) if peers else []
        for n in nfes:
            matrix, worst = fit_shared(diffusion, n, fit_on, select, iters)
            table[(name, n)] = matrix
            d = default_solver(diffusion.objective, n)
            t = diffusion.sampling_schedule(n, d['spacing'])[0].tolist()
            if worst < 1:
                saved[f"{name} {n}"] = dict(t=t, matrix=matrix.tolist(), select_worst=worst)
            cells = []
            for net, x, ref in test:
                untuned = rms(sample_loop(net, x, diffusion, n)[0], ref)
                shared = sample_loop(net, x, diffusion, n, spacing=d['spacing'], matrix=matrix)
                theirs = [
                    rms(run_diffusers(net, x, diffusion, n, c, kw)[0], ref) for _, c, kw in configs
                ]
                cells.append(
                    dict(
                        shared=rms(shared[0], ref),
                        untuned=untuned,
                        peer=min(theirs, default=math.nan),
                    )
                )
            line = ''.join(
                f"  {summary(cells, a, b)}"
                for a, b in (('shared', 'untuned'), ('shared', 'peer'), ('untuned', 'peer'))
            )
            print(f"{name:<10}{n:>4}  {worst:6.2f}{line}", flush=True)
    if out:
        with open(out, 'w', encoding='utf-8') as f:
            json.dump(saved, f, indent=1)
    return table
