"""
The exact-answer sampler benchmark. The data is a Gaussian mixture, whose optimal denoiser E[x0 |
x_t] is closed form, so any error is the sampler's alone. Each of our samplers and the usual
diffusers scheduler configurations is driven by the same exact 'network' from the same noise, and
each end point is compared with a high-accuracy solve of the same probability-flow ODE from the same
start.

    python bench_samplers.py                         # the tables (80 s on 2 busy CPU cores)
    python bench_samplers.py --diffusers_at_sigma=True --cfg_scale=5.0
    python bench_samplers.py --mixtures=6 --tune_iters=200   # held out: 6 other mixtures
    python bench_samplers.py --mixtures=6 --shared=True      # one matrix fitted on 24 others

The tables are on one mixture, the one the default was chosen on; --mixtures=N scores the default
solver untuned and fitted to each model (samplers.tune_solver), and the best diffusers
configuration, on N others and on noise that no fit saw: the median and worst cell
(bench_mixtures.py).

Why a mixture: on Gaussian data (--gaussian=True, kept as a unit check: bench_gaussian.py) the ODE
is linear, errors cancel and the ranking of the samplers flips with the data's std. Here the
components have different widths (some as sharp as pixel values), so the denoiser is strongly
nonlinear at low noise. The classes are groups of components, so the class-conditional denoiser, and
CFG, are exact too. diffusers' rows: bench_diffusers.py. On a trained shapes model instead, accuracy
and factor FD per sampler and NFE (bench_quality.py):

    python bench_samplers.py --quality=out-shapes --cfg_scale=4
"""

import functools
import importlib.util
import math
import sys
import time

import torch

from bench_diffusers import diffusers_configs, run_diffusers
from bench_gaussian import print_solver_table
from bench_mixtures import (
    OBJECTIVES,
    component,
    exact_net,
    held_out,
    make_mixture,
    print_held_out,
    reference,
    rms,
    start,
)
from bench_transfer import shared_table, warp_table
from bench_quality import quality_table
from configurator import check
from diffusion import Diffusion
from samplers import default_solver, sample_loop, solver_name, tune_solver

# -----------------------------------------------------------------------------
dims = 32
# mixture components, their stds log-spaced from std_min to std_max
components = 8
# component k belongs to class k % classes
classes = 4
# the sharpest component (8-bit pixels on [-1, 1] are 0.008 apart)
std_min = 0.02
std_max = 0.5
num_samples = 1024
# the guided tables; the others are class-conditional without guidance (scale 1)
cfg_scale = 3.0
nfes = (5, 10, 20, 50)
# the NFE of the std columns (one of nfes)
std_nfe = 10
# RK4 steps in log-SNR for the reference; it is checked against half as many
ref_steps = 1000
# True: call the model at the noise level of diffusers' own sigmas, not at the timesteps
# that a pipeline passes (rounded to integers by most of its schedulers)
diffusers_at_sigma = False
seed = 0
# instead: the Gaussian unit check (data N(0.3, 0.5^2): a closed-form, linear ODE)
gaussian = False
# instead: a shapes checkpoint folder -> accuracy and factor FD per sampler and NFE
quality = ''
quality_per_class = 20
quality_nfes = (3, 5, 10, 20)
# quality: the tuned solver's row up to this NFE
tune_max_steps = 10
# instead: the held-out table over this many other mixtures (bench_mixtures.py): the default solver
# untuned, fitted and the best diffusers configuration, each scored on noise no fit saw
mixtures = 0
# held-out: each of its three noise batches (fit, select, score), and its NFEs; the fit is
# checked on mixture_check times as many more (samplers.fit_verdict)
mixture_samples = 512
mixture_check = 4
# held-out: the fit and select batches, in mixture_samples (1 overfits: at 10 NFE a fit to 512
# samples lost on fresh noise where one to 2048 won; RESULTS.md); mixture_check a multiple of it
mixture_fit = 4
mixture_nfes = (5, 10, 20)
# with mixtures: instead, one warp of the default's grid per objective and NFE chosen on as many
# other mixtures, scored on these (a transferable default after "Align Your Steps"; not kept)
warp = False
# with mixtures: instead, one solver matrix per objective and NFE fitted over shared_train other
# mixtures at once and scored on these (bench_transfer.shared_table; tune_iters its steps)
shared = False
shared_train = 24
# with shared: write the matrices (and their grids) to this JSON file
shared_out = ''
device = 'auto'
# -----------------------------------------------------------------------------

# the tuned solver's row: fitted on this many other noise samples, at NFE <= tune_max_nfe
tune_samples = 2048
tune_max_nfe = 10
# its gradient steps (samplers.tune_solver)
tune_iters = 400


# -----------------------------------------------------------------------------
# The samplers: ours through sample_loop (diffusers' schedulers: bench_diffusers.py)


def default_config(name):
    """(sampler, order, None): what sample_loop does when none is named: samplers.default_solver,
    its spacing chosen by the step count."""
    d = default_solver(OBJECTIVES[name][0], 10)
    return d['sampler'], d['order'], None


def our_configs(name):
    """(sampler, order, spacing) for each of our samplers that integrates the ODE (not ddpm, which
    draws noise), the default first. flow: 'flowtime' is its time-uniform grid ('linspace'); vp:
    also 'trailing', diffusers' one."""
    uniform = ['flowtime'] + (['trailing'] if OBJECTIVES[name][0] == 'vp' else [])
    configs = (
        [
            ('dpm++', 1, 'logsnr'),
            ('dpm++', 2, 'logsnr'),
            ('dpm++', 3, 'logsnr'),
            ('dpm++', 2, 'karras'),
            ('dpm++', 3, 'karras'),
        ]
        + [('dpm++', 2, u) for u in uniform]
        + [('ddim', 1, u) for u in uniform]
    )
    if OBJECTIVES[name][0] == 'flow':
        configs += [('euler', 1, 'flowtime'), ('heun', 2, 'flowtime'), ('heun', 2, 'karras')]
    configs += [('unipc', o, s) for s in ['logsnr', 'karras'] + uniform for o in (2, 3)]
    default = default_config(name)
    return [default] + [c for c in configs if c != default]


def our_name(sampler, order, spacing, default=None):
    name = solver_name(sampler, order, spacing)
    return name + (' (default)' if (sampler, order, spacing) == default else '')


def run_tuned(net, x, diffusion, nfe, tune):
    """The default solver fitted (tune_solver) to this model on other noise: what sample.py
    --tune=True does for a checkpoint. tune() -> (its model, noise, exact end points), made once.
    None above tune_max_nfe."""
    if nfe > tune_max_nfe:
        return None
    d = default_solver(diffusion.objective, nfe)
    model, (x_fit, x_val, x_check), (ref, ref_val, ref_check) = tune()
    solver = (d['sampler'], d['order'], d['spacing'])
    matrix, _ = tune_solver(
        model,
        x_fit,
        x_val,
        diffusion,
        nfe,
        *solver,
        ref,
        ref_val,
        iters=tune_iters,
        x_check=x_check,
        ref_check=ref_check,
    )
    return sample_loop(net, x, diffusion, nfe, spacing=d['spacing'], matrix=matrix)[0]


def run_ours(net, x, diffusion, nfe, sampler, order, spacing):
    # heun: 2 calls a step, 1 for the last
    steps = (nfe + 1) // 2 if sampler == 'heun' else nfe
    out, used = sample_loop(net, x, diffusion, steps, sampler, order, spacing)
    assert used <= nfe, (sampler, nfe, used)
    return out


# -----------------------------------------------------------------------------
# The tables


def spread(out, ref, mix):
    """Over the samples that land in the reference's component: their RMS distance from its mean in
    units of its std, over the reference's. < 1: pulled towards the component mean (blurred detail);
    > 1: noisier than data."""
    k = component(ref, mix)
    same = component(out, mix) == k
    dist = lambda z: (
        ((z[same] - mix.mu[k[same]]) / mix.std[k[same], None]).pow(2).mean().sqrt().item()
    )
    return dist(out) / dist(ref)


def bench(name, w, mix, x, labels):
    """Rows (name, is ours, [RMS error at each NFE], std / the reference's, spread) for one
    objective and CFG scale, the std and spread at std_nfe; and the reference's own error, its
    change from ref_steps / 2 steps."""
    diffusion = Diffusion(*OBJECTIVES[name])
    alpha, sigma = start(diffusion)
    ref = reference(x, alpha, sigma, mix, labels, w, ref_steps)
    gap = rms(ref, reference(x, alpha, sigma, mix, labels, w, ref_steps // 2))
    net = exact_net(diffusion, mix, labels, w)
    default = default_config(name)
    runs = [
        (our_name(*c, default), True, lambda n, c=c: run_ours(net, x, diffusion, n, *c))
        for c in our_configs(name)
    ]

    @functools.lru_cache(maxsize=1)
    # the fit's labels' exact model, its noise, the noise its iterate is selected on and that it
    # is checked on (none the benchmark's), and their exact end points
    def tune():
        g = torch.Generator().manual_seed(seed + 2)
        xs = [torch.randn(tune_samples, x.shape[1], generator=g, dtype=x.dtype) for _ in range(3)]
        labels_tune = torch.arange(tune_samples) % classes
        refs = [reference(z, alpha, sigma, mix, labels_tune, w, ref_steps) for z in xs]
        return exact_net(diffusion, mix, labels_tune, w), xs, refs

    runs.insert(
        1,
        (
            our_name(*default[:2], 'tuned solver'),
            True,
            lambda n: run_tuned(net, x, diffusion, n, tune),
        ),
    )
    # a test-only reference: without it, our rows alone
    if importlib.util.find_spec('diffusers'):
        runs += [
            (
                row,
                False,
                lambda n, c=c, kw=kw: run_diffusers(
                    net, x, diffusion, n, c, kw, diffusers_at_sigma
                )[0],
            )
            for row, c, kw in diffusers_configs(*OBJECTIVES[name])
        ]
    rows = []
    for row, ours, fn in runs:
        outs = {n: fn(n) for n in nfes}
        out = outs[std_nfe]
        rows.append(
            (
                row,
                ours,
                [rms(outs[n], ref) if outs[n] is not None else math.nan for n in nfes],
                out.std().item() / ref.std().item(),
                spread(out, ref, mix),
            )
        )
    return rows, gap


def print_table(name, by_cfg):
    """One objective: a row a configuration; RMS error at each NFE, std and spread at std_nfe;
    unguided | CFG."""
    (w1, a), (w2, b) = by_cfg.items()
    width = max(len(r[0]) for r in a) + 1
    head = ''.join(f"{f'{n} NFE':>8}" for n in nfes) + f"{'std':>6}{'sprd':>6}"
    print(f"\n{name:<{width}}{f'cfg {w1:g}':^{len(head)}} | {f'cfg {w2:g}':^{len(head)}}")
    print(f"{'':<{width}}{head} | {head}")
    cell = lambda r: ''.join(f"{e:8.1e}" for e in r[2]) + f"{r[3]:6.2f}{r[4]:6.2f}"
    for i, (ra, rb) in enumerate(zip(a, b)):
        if i and not ra[1] and a[i - 1][1]:
            print(f"{'diffusers ':-<{width + 2 * len(head) + 3}}")
        print(f"{ra[0]:<{width}}{cell(ra)} | {cell(rb)}")


def print_ratios(results):
    """Our default's error, tuned to the model (as sample.py --tune=True leaves it) and not, and our
    best configuration's, over the best diffusers configuration's, at each NFE."""
    print(
        "\nour error / the best diffusers configuration's (the goal: default <= 0.5 at 5 and 10 "
        "NFE); 'tuned': the default\nwith its solver fitted to the model on other noise (sample.py "
        "--tune=True), used when present"
    )
    print(
        f"{'':<15}{'NFE':>4}  {'best diffusers':<25}{'error':>7}  "
        f"{'default':>7}{'ratio':>6}{'tuned':>8}{'ratio':>6}  {'best of ours':<20}{'ratio':>6}"
    )
    for (name, w), rows in results.items():
        # bench puts them first
        default, tuned = rows[:2]
        for j, n in enumerate(nfes):
            error = lambda r: math.inf if math.isnan(r[2][j]) else r[2][j]
            theirs = min((r for r in rows if not r[1]), key=error, default=None)
            if theirs is None:
                continue
            ours = min((r for r in rows if r[1]), key=error)
            e = theirs[2][j]
            fit = '-' if math.isnan(tuned[2][j]) else f"{tuned[2][j]:.1e}{tuned[2][j] / e:6.2f}"
            print(
                f"{f'{name} cfg {w:g}':<15}{n:>4}  {theirs[0]:<25}{e:7.1e}  "
                f"{default[2][j]:7.1e}{default[2][j] / e:6.2f}{fit:>14}  "
                f"{ours[0]:<20}{ours[2][j] / e:6.2f}"
            )


def check_config():
    check(
        globals(),
        positive=(
            'dims',
            'components',
            'classes',
            'std_min',
            'std_max',
            'num_samples',
            'ref_steps',
            'mixture_samples',
            'mixture_check',
            'mixture_fit',
            'shared_train',
        ),
    )
    if std_nfe not in nfes or cfg_scale == 1:
        sys.exit(
            f"error: --std_nfe={std_nfe} must be one of --nfes={nfes}, and "
            f"--cfg_scale={cfg_scale:g} not 1"
        )
    if mixture_check % mixture_fit:
        sys.exit(
            f"error: --mixture_check={mixture_check} must be a multiple of "
            f"--mixture_fit={mixture_fit}: the check batch goes through the fit's batches"
        )
    if (warp or shared) and not mixtures:
        sys.exit("error: --warp and --shared score on held-out mixtures: add --mixtures=6")


def main():
    t0 = time.time()
    check_config()
    if gaussian:
        return print_solver_table()
    if quality:
        return quality_table(
            quality,
            cfg_scale,
            quality_per_class,
            quality_nfes,
            tune_max_steps,
            tune_iters,
            seed,
            device,
        )
    threads = torch.get_num_threads()
    # [1024, 32] tensors: more threads only contend
    torch.set_num_threads(1)
    if mixtures and warp:
        return warp_table(mixtures, mixture_samples, mixture_nfes, ref_steps, seed)
    if mixtures and shared:
        nfes = [n for n in mixture_nfes if n <= tune_max_nfe]
        args = (mixtures, mixture_samples, nfes, ref_steps, tune_iters, seed, shared_train)
        shared_table(*args, out=shared_out)
        return print(f"\n({time.time() - t0:.0f} s)")
    if mixtures:
        results, gap = held_out(
            mixtures,
            mixture_samples,
            mixture_nfes,
            ref_steps,
            tune_iters,
            seed,
            diffusers_at_sigma,
            check=mixture_check,
            fit=mixture_fit,
        )
        print_held_out(results, gap, ref_steps, mixture_samples, mixture_check, mixture_fit)
        print(f"\n({time.time() - t0:.0f} s)")
        return results
    mix = make_mixture(dims, components, classes, std_min, std_max, seed)
    x = torch.randn(
        num_samples, dims, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    labels = torch.arange(num_samples) % classes
    print(
        f"Gaussian mixture: {dims} dims, {components} components (std {std_min:g}..{std_max:g}), "
        f"{classes} classes, {num_samples} samples.\nEach cell: the RMS distance of the end point "
        "from the exact ODE solution from the same noise.\nAt "
        f"{std_nfe} NFE, std: the end points' std / the reference's; sprd: their spread within "
        "their component / the reference's (< 1: shrunk)."
    )
    if diffusers_at_sigma:
        print("diffusers: the model called at its schedulers' own sigmas (diffusers_at_sigma)")
    results, gaps = {}, []
    for name in OBJECTIVES:
        for w in (1.0, cfg_scale):
            results[(name, w)], gap = bench(name, w, mix, x, labels)
            gaps.append(gap)
        print_table(name, {w: results[(name, w)] for w in (1.0, cfg_scale)})
    smallest = min(e for rows in results.values() for r in rows for e in r[2] if not math.isnan(e))
    print(
        f"\nreference: RK4 uniform in log-SNR, {ref_steps} steps; it moves <= {max(gaps):.1e} "
        f"(RMS) from {ref_steps // 2} steps, {smallest / max(gaps):.0f}x less than the smallest "
        f"error above ({smallest:.1e})"
    )
    print_ratios(results)
    print(f"\n({time.time() - t0:.0f} s)")
    torch.set_num_threads(threads)
    return results


if __name__ == '__main__':
    from configurator import configure

    configure(globals())
    main()
