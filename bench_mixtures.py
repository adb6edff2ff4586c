"""
The exact-answer problem of bench_samplers.py: Gaussian mixtures, whose optimal denoiser E[x0 | x_t]
is closed form, the exact 'network' of each objective, and a high-accuracy solve of the
probability-flow ODE to score samplers against. And the held-out table (bench_samplers.py
--mixtures=6): the default solver, the same solver fitted to each model (samplers.tune_solver) and
the best diffusers scheduler configuration, each scored on noise no fit saw, over mixtures that
differ from the benchmark's own in dimension, component count, weights, stds and seed:

    python bench_samplers.py --mixtures=6
"""

import math
import statistics

import torch

from bench_diffusers import diffusers_configs, run_diffusers
from diffusion import Diffusion
from samplers import default_solver, sample_loop, tune_solver

OBJECTIVES = {
    'vp-linear': ('vp', 'linear', 'eps'),
    'vp-cosine': ('vp', 'cosine', 'v'),
    'flow': ('flow', 'cosine', 'v'),
}


class Mixture:
    """sum_k w_k N(mu_k, s_k^2 I) in float64; labels[k] is component k's class."""

    def __init__(self, mu, std, weights, labels):
        self.mu, self.std, self.logw, self.labels = mu, std, weights.log(), labels


def make_mixture(dims=32, components=8, classes=4, std_min=0.02, std_max=0.5, seed=0):
    """bench_samplers.py's mixture: means uniform in [-0.7, 0.7]^dims, stds log-spaced from
    std_min to std_max, weights uniform in [0.5, 1.5] (normalised)."""
    g = torch.Generator().manual_seed(seed)
    # inside [-1, 1], as pixels
    mu = 0.7 * (2 * torch.rand(components, dims, generator=g, dtype=torch.float64) - 1)
    std = torch.logspace(math.log10(std_min), math.log10(std_max), components, dtype=torch.float64)
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return Mixture(mu, std, weights / weights.sum(), torch.arange(components) % classes)


def mixture_x0(x_t, alpha, sigma, mix, labels=None):
    """E[x0 | x_t] for x_t = alpha x0 + sigma eps, x0 from the mixture (or, given labels [N], from
    each sample's class): the responsibilities r_k from x_t's marginal N(alpha mu_k, v_k I), v_k =
    alpha^2 s_k^2 + sigma^2, times each component's Gaussian posterior mean mu_k + alpha s_k^2 / v_k
    (x_t - alpha mu_k)."""
    # [K]
    var = alpha**2 * mix.std**2 + sigma**2
    # |x_t - alpha mu_k|^2 expanded into matrix products: no [N, K, D] tensor, ~10x faster
    dist = (
        x_t.pow(2).sum(1, keepdim=True)
        - 2 * alpha * x_t @ mix.mu.T
        + alpha**2 * mix.mu.pow(2).sum(1)
    )
    # [N, K]
    logp = mix.logw - 0.5 * x_t.shape[1] * var.log() - 0.5 * dist / var
    # the class-conditional posterior: the other classes' components have zero weight
    if labels is not None:
        logp = logp.masked_fill(mix.labels != labels[:, None], -math.inf)
    # log-sum-exp inside: no underflow when one component dominates
    r = logp.softmax(dim=1)
    # each responsibility times its component's gain
    rg = r * (alpha * mix.std**2 / var)
    return r @ mix.mu + rg.sum(1, keepdim=True) * x_t - alpha * rg @ mix.mu


def guided_x0(x_t, alpha, sigma, mix, labels, w):
    """CFG: uncond + w (cond - uncond). Every output type (eps, v, x0, velocity) is affine in x0
    with the same x_t, so guiding the x0 prediction is guiding the network output, as
    samplers.guided does."""
    cond = mixture_x0(x_t, alpha, sigma, mix, labels)
    if w == 1:
        return cond
    uncond = mixture_x0(x_t, alpha, sigma, mix)
    return uncond + w * (cond - uncond)


def exact_net(diffusion, mix, labels, w=1.0):
    """The optimal network as model_fn(x, t) at objective time t, with the output it is trained to
    predict."""

    def fn(x, t):
        alpha, sigma = (
            v.item() for v in diffusion.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        )
        x0 = guided_x0(x, alpha, sigma, mix, labels, w)
        if diffusion.objective == 'flow':
            # the velocity eps - x0
            return (x - x0) / sigma
        eps = (x - alpha * x0) / sigma
        return {'eps': eps, 'v': alpha * eps - sigma * x0, 'x0': x0}[diffusion.prediction]

    return fn


def reference(x, alpha, sigma, mix, labels, w=1.0, steps=1000, s_end=1e-5):
    """The probability-flow ODE's end point from x at noise level (alpha, sigma): classic RK4,
    uniform in lambda = log(alpha / sigma). In z = x / sigma the ODE is dz/dlambda = e^lambda D(z
    e^-lambda, s = e^-lambda), D the guided x0 prediction at noise level s for input y = x / alpha.
    That right side stays bounded from pure noise (lambda -> -inf, where flow starts) to s_end,
    where D(y) is the answer to O((s_end / std_min)^2). It shares no code with sample_loop."""
    D = lambda z, lam: guided_x0(z * math.exp(-lam), 1.0, math.exp(-lam), mix, labels, w)
    f = lambda z, lam: math.exp(lam) * D(z, lam)
    lam0 = math.log(alpha / sigma) if alpha > 0 else -math.inf
    # below -12 the integrand is the data mean times e^lambda: one exact step, to O(e^-24)
    lo = max(lam0, -12.0)
    z = x / sigma
    z = z + (math.exp(lo) - math.exp(lam0)) * D(z, lo)
    h = (math.log(1 / s_end) - lo) / steps
    for i in range(steps):
        lam = lo + i * h
        k1 = f(z, lam)
        k2 = f(z + h / 2 * k1, lam + h / 2)
        k3 = f(z + h / 2 * k2, lam + h / 2)
        k4 = f(z + h * k3, lam + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return D(z, lo + steps * h)


def component(z, mix):
    """Each sample's most likely component at noise level 0."""
    log_lik = (
        mix.logw
        - z.shape[1] * mix.std.log()
        - 0.5 * (z[:, None] - mix.mu).pow(2).sum(-1) / mix.std**2
    )
    return log_lik.argmax(1)


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def start(diffusion):
    """(alpha, sigma) at our samplers' first time, pure noise: vp the last training step, flow t =
    1."""
    t = 1.0 if diffusion.objective == 'flow' else diffusion.T - 1.0
    return [v.item() for v in diffusion.alpha_sigma(torch.tensor(t, dtype=torch.float64))]


# -----------------------------------------------------------------------------
# The held-out table: mixtures that neither the default's choice nor any fit saw


def held_out_mixture(i, seed=0):
    """The i-th held-out mixture, drawn from seed + 1000 + i: 8-64 dims, 3-16 components of stds
    log-spaced from 0.005-0.05 to 0.3-1.0 (shuffled among the classes), weights exp(skew N(0, 1))
    with skew in [0, 1.5], 2-4 classes; guided at CFG 3 every other mixture. -> (Mixture, CFG scale,
    a description)."""
    g = torch.Generator().manual_seed(seed + 1000 + i)
    r = torch.rand(6, generator=g, dtype=torch.float64).tolist()
    dims, components = 8 + int(57 * r[0]), 3 + int(14 * r[1])
    classes = min(components, 2 + int(3 * r[2]))
    std_min, std_max, skew = 10 ** (-2.3 + r[3]), 0.3 + 0.7 * r[4], 1.5 * r[5]
    mu = 0.7 * (2 * torch.rand(components, dims, generator=g, dtype=torch.float64) - 1)
    std = torch.logspace(math.log10(std_min), math.log10(std_max), components, dtype=torch.float64)
    std = std[torch.randperm(components, generator=g)]
    weights = (skew * torch.randn(components, generator=g, dtype=torch.float64)).exp()
    mix = Mixture(mu, std, weights / weights.sum(), torch.arange(components) % classes)
    w = 3.0 if i % 2 else 1.0
    about = (
        f"{dims} dims, {components} components (std {std_min:.3f}..{std_max:.2f}, weights "
        f"{weights.min() / weights.sum():.3f}..{weights.max() / weights.sum():.3f}), "
        f"{classes} classes, CFG {w:g}"
    )
    return mix, w, about


def score_cell(nets, mix, batches, refs, diffusion, nfe, iters, peers, at_sigma):
    """One objective, mixture and NFE: the RMS errors on the third batch (never fitted to, selected
    or checked on) of the default solver untuned, fitted (on the first batch, its iterate selected
    on the second and kept only where it wins on the fourth, fit_verdict: else the untuned solver
    is what runs, as in sample.py), and the best of the diffusers configurations peers; and how
    many of the fitted and untuned end points land in another component than the reference's (one
    such sample can dominate the RMS). nets: the exact network for the scoring batch's labels and
    for the fitting batch's."""
    (net, net_fit), (x_fit, x_val, x, x_check) = nets, batches
    ref_fit, ref_val, ref, ref_check = refs
    d = default_solver(diffusion.objective, nfe)
    solver = (d['sampler'], d['order'], d['spacing'])
    untuned = sample_loop(net, x, diffusion, nfe, *solver)[0]
    matrix, info = tune_solver(
        net_fit,
        x_fit,
        x_val,
        diffusion,
        nfe,
        *solver,
        ref_fit,
        ref_val,
        iters=iters,
        x_check=x_check,
        ref_check=ref_check,
    )
    fitted = untuned
    if info['used']:
        fitted = sample_loop(net, x, diffusion, nfe, spacing=d['spacing'], matrix=matrix)[0]
    theirs = [
        (rms(run_diffusers(net, x, diffusion, nfe, c, kw, at_sigma)[0], ref), row)
        for row, c, kw in peers
    ]
    best = min(theirs, default=(math.nan, '-'))
    k = component(ref, mix)
    cell = dict(used=info['used'], why=info['why'], peer=best[0], peer_name=best[1])
    for key, out in (('untuned', untuned), ('fitted', fitted)):
        cell[key], cell[f"{key}_off"] = rms(out, ref), (component(out, mix) != k).sum().item()
    return cell


def score_mixture(
    name, mix, w, num_samples, nfes, ref_steps, iters, seed, peers, at_sigma, check, fit=1
):
    """-> ({nfe: score_cell's}, the reference's change from ref_steps / 2 steps) for one objective
    and mixture; three noise batches of num_samples drawn from seed (fit, select, score), then the
    check batch of check * num_samples; with fit > 1, the fit and select batches are then drawn
    again, fit * num_samples each (the score and check batches stay those of fit = 1)."""
    diffusion = Diffusion(*OBJECTIVES[name])
    alpha, sigma = start(diffusion)
    labels = torch.arange(num_samples) % (int(mix.labels.max()) + 1)
    g = torch.Generator().manual_seed(seed)
    dims = mix.mu.shape[1]
    batches = [
        torch.randn(k * num_samples, dims, generator=g, dtype=torch.float64)
        for k in (1, 1, 1, check)
    ]
    if fit > 1:
        batches[:2] = [
            torch.randn(fit * num_samples, dims, generator=g, dtype=torch.float64) for _ in range(2)
        ]
    # the check batch goes through tune_solver's model in batches of num_samples
    refs = [
        reference(x, alpha, sigma, mix, labels.repeat(len(x) // num_samples), w, ref_steps)
        for x in batches
    ]
    gap = rms(refs[2], reference(batches[2], alpha, sigma, mix, labels, w, ref_steps // 2))
    nets = [exact_net(diffusion, mix, labels.repeat(k), w) for k in (1, fit)]
    cells = {
        n: score_cell(nets, mix, batches, refs, diffusion, n, iters, peers, at_sigma) for n in nfes
    }
    return cells, gap


def held_out(
    mixtures,
    num_samples,
    nfes,
    ref_steps,
    iters,
    seed=0,
    at_sigma=False,
    peers=True,
    check=4,
    fit=1,
):
    """-> ({(objective, nfe): [score_cell's, one a mixture]}, the reference's largest change);
    prints each mixture as it goes. peers: with diffusers' configurations (False: none); check and
    fit: the check batch and the fit and select batches in num_samples."""
    results, gaps = {}, []
    for i in range(mixtures):
        mix, w, about = held_out_mixture(i, seed)
        print(f"mixture #{i + 1}: {about}", flush=True)
        for name in OBJECTIVES:
            configs = diffusers_configs(*OBJECTIVES[name]) if peers else []
            noise_seed = seed + 2000 + i
            cells, gap = score_mixture(
                name,
                mix,
                w,
                num_samples,
                nfes,
                ref_steps,
                iters,
                noise_seed,
                configs,
                at_sigma,
                check,
                fit,
            )
            gaps.append(gap)
            for n, cell in cells.items():
                results.setdefault((name, n), []).append(cell)
    return results, max(gaps)


def summary(cells, num, den):
    """'median  worst (#mixture)' of the ratios num / den over the mixtures."""
    ratios = [c[num] / c[den] for c in cells]
    worst = max(range(len(ratios)), key=lambda i: ratios[i])
    return f"{statistics.median(ratios):7.2f}{ratios[worst]:7.2f} (#{worst + 1})"


def print_held_out(results, gap, ref_steps, num_samples, check=4, fit=1):
    """Per objective and NFE: the median and worst cell over the mixtures of fitted / best
    diffusers, untuned / best diffusers and fitted / untuned; then the cells short of the goals."""
    n = num_samples
    print(
        f"\nheld-out noise: each solver scored on {n} noise samples that no fit saw (fitted on "
        f"{fit * n} others, its iterate selected on {fit * n} more, kept only where it beat the "
        f"untuned solver on {check * n} more: samplers.fit_verdict)"
    )
    cols = ('fitted / diffusers', 'untuned / diffusers', 'fitted / untuned')
    print(f"{'':<10}{'NFE':>4}" + ''.join(f"  {c:>19}" for c in cols) + "  fit kept")
    print(f"{'':<14}" + "  median  worst (mix)" * 3)
    pairs = (('fitted', 'peer'), ('untuned', 'peer'), ('fitted', 'untuned'))
    for (name, n), cells in results.items():
        row = ''.join(f" {summary(cells, a, b):>20}" for a, b in pairs)
        print(f"{name:<10}{n:>4}{row}  {sum(c['used'] for c in cells)}/{len(cells)}")
    print("\nwhere the goals are not met (fitted <= 0.5x the best diffusers at 5 and 10 NFE; never")
    print("worse than untuned):")
    misses = [
        f"  {name} {n} NFE #{i + 1}: fitted {c['fitted']:.1e} vs {c['peer_name']} {c['peer']:.1e}"
        f" ({c['fitted'] / c['peer']:.2f}x), untuned {c['untuned']:.1e}; in another component:"
        f" fitted {c['fitted_off']}, untuned {c['untuned_off']} of {num_samples}"
        for (name, n), cells in results.items()
        for i, c in enumerate(cells)
        if (n <= 10 and c['fitted'] > 0.5 * c['peer']) or c['fitted'] > c['untuned']
    ]
    print('\n'.join(misses) or '  none')
    smallest = min(c[k] for cells in results.values() for c in cells for k in ('fitted', 'peer'))
    print(
        f"\nreference: RK4 in log-SNR, {ref_steps} steps; it moves <= {gap:.1e} (RMS) from "
        f"{ref_steps // 2} steps, {smallest / gap:.0f}x less than the smallest error "
        f"({smallest:.1e})"
    )
