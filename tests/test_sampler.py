"""Samplers against diffusers' reference schedulers, on a model whose answer is known in closed
form: for data x0 ~ N(MU, S^2 I) the optimal denoiser E[x0 | x_t] is linear, so the 'network' below
is exact and any difference between two samplers is a difference in the samplers."""

import pytest
import torch

from diffusion import Diffusion
from samplers import (
    fit_verdict,
    sample_loop,
    sample_unipc,
    solver_matrix,
    threshold_x0,
    tune_solver,
)
from bench_gaussian import gaussian_x0
from conftest import one_line_exit, require

# skips without diffusers; fails instead in CI (conftest.py)
diffusers = require('diffusers')

MU, S = 0.3, 0.5
BETAS = {'linear': 'linear', 'cosine': 'squaredcos_cap_v2'}


def net(diffusion, prediction='eps'):
    """The exact denoiser as a 'network' with the given output type, called at objective time t."""

    def fn(x, t):
        alpha, sigma = (
            float(v) for v in diffusion.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        )
        x0 = gaussian_x0(x, alpha, sigma, MU, S)
        if diffusion.objective == 'flow':
            # velocity eps - x0
            return (x - x0) / sigma
        eps = (x - alpha * x0) / sigma
        return {'eps': eps, 'v': alpha * eps - sigma * x0, 'x0': x0}[prediction]

    return fn


def noise(dtype=torch.float32, seed=0):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def float64_sigmas(sched, diffusion):
    """diffusers keeps its sigmas in float32. Near pure noise on the cosine schedule alpha is ~5e-5
    and eps -> x0 divides by it, so float32 rounding of the schedule alone moves results by ~1e-3;
    to compare the algorithms, give diffusers the same schedule in float64 (its own formula)."""
    ac = diffusion.alphas_cumprod
    sched.sigmas = torch.cat(
        [((1 - ac) / ac).sqrt()[sched.timesteps], torch.zeros(1, dtype=torch.float64)]
    )


def run_diffusers(sched, x, model, steps, float64_from=None, **step_kw):
    sched.set_timesteps(steps)
    if float64_from is not None:
        float64_sigmas(sched, float64_from)
    for t in sched.timesteps:
        x = sched.step(model(x, float(t)), t, x, **step_kw).prev_sample
    return x


@pytest.mark.parametrize('steps', [5, 10, 20])
def test_dpm_solver_pp_2m_float32_unmodified_diffusers(steps):
    diffusion = Diffusion('vp', 'linear', 'eps', 1000)
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule='linear',
        beta_start=1e-4,
        beta_end=0.02,
        solver_order=2,
        algorithm_type='dpmsolver++',
    )
    x = noise()
    ours, nfe = sample_loop(
        net(diffusion), x, diffusion, steps, 'dpm++', order=2, spacing='linspace'
    )
    ref = run_diffusers(sched, x, net(diffusion), steps)
    assert nfe == steps
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize(
    'steps, spacing',
    [
        (5, 'linspace'),
        (10, 'linspace'),
        (20, 'linspace'),
        (50, 'linspace'),
        (10, 'trailing'),
        (20, 'trailing'),
    ],
)
@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_dpm_solver_pp_orders(schedule, order, steps, spacing, prediction):
    diffusion = Diffusion('vp', schedule, prediction, 1000)
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule=BETAS[schedule],
        beta_start=1e-4,
        beta_end=0.02,
        solver_order=order,
        algorithm_type='dpmsolver++',
        prediction_type={'eps': 'epsilon', 'v': 'v_prediction'}[prediction],
        timestep_spacing=spacing,
        final_sigmas_type='zero',
        lower_order_final=True,
    )
    x = noise(torch.float64)
    ours, _ = sample_loop(
        net(diffusion, prediction), x, diffusion, steps, 'dpm++', order=order, spacing=spacing
    )
    ref = run_diffusers(sched, x, net(diffusion, prediction), steps, float64_from=diffusion)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('steps, spacing', [(10, 'leading'), (50, 'leading'), (20, 'trailing')])
@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
def test_ddim(schedule, steps, spacing, eta):
    diffusion = Diffusion('vp', schedule, 'eps', 1000)
    sched = diffusers.DDIMScheduler(
        beta_schedule=BETAS[schedule],
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
        steps_offset=0,
    )
    x = noise(torch.float64)
    ours, _ = sample_loop(
        net(diffusion),
        x,
        diffusion,
        steps,
        'ddim',
        eta=eta,
        spacing=spacing,
        generator=torch.Generator().manual_seed(7),
    )
    # float64 schedule, as above
    sched.alphas_cumprod = diffusion.alphas_cumprod
    ref = run_diffusers(
        sched, x, net(diffusion), steps, eta=eta, generator=torch.Generator().manual_seed(7)
    )
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('steps', [1000, 50])
def test_ddpm_ancestral_with_the_same_noise(schedule, steps):
    diffusion = Diffusion('vp', schedule, 'eps', 1000)
    sched = diffusers.DDPMScheduler(
        beta_schedule=BETAS[schedule],
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        variance_type='fixed_small',
        timestep_spacing='leading',
        steps_offset=0,
    )
    sched.alphas_cumprod = diffusion.alphas_cumprod
    sched.betas = 1 - diffusion.alphas_cumprod / torch.cat(
        [torch.ones(1, dtype=torch.float64), diffusion.alphas_cumprod[:-1]]
    )
    x = noise(torch.float64)
    ours, _ = sample_loop(
        net(diffusion),
        x,
        diffusion,
        steps,
        'ddpm',
        spacing='leading',
        generator=torch.Generator().manual_seed(3),
    )
    ref = run_diffusers(sched, x, net(diffusion), steps, generator=torch.Generator().manual_seed(3))
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('steps', [5, 20])
def test_flow_euler_matches_flow_match_euler(steps):
    diffusion = Diffusion('flow')
    ts, _, _ = diffusion.sampling_schedule(steps, 'linspace')
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    # the same times; diffusers appends the final 0
    sched.set_timesteps(sigmas=ts.float().numpy())
    x = noise()
    ours, nfe = sample_loop(net(diffusion), x, diffusion, steps, 'euler', spacing='linspace')
    ref = x
    for sigma, t in zip(sched.sigmas[:-1], sched.timesteps):
        ref = sched.step(net(diffusion)(ref, sigma.item()), t, ref).prev_sample
    assert nfe == steps
    assert (ours - ref).abs().max().item() <= 1e-5


def test_dynamic_thresholding_matches_diffusers():
    sched = diffusers.DPMSolverMultistepScheduler(
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5
    )
    x0 = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        threshold_x0(x0, 0.9, 1.5), sched._threshold_sample(x0.clone()), rtol=0, atol=1e-6
    )
    assert threshold_x0(x0, 0.9, 1.5).abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize('schedule, name', [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')])
def test_schedules_match_diffusers(schedule, name):
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=name, beta_start=1e-4, beta_end=0.02
    )
    ours = Diffusion('vp', schedule, 'eps', 1000).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('objective', ['vp', 'flow'])
@pytest.mark.parametrize('spacing', ['logsnr', 'karras'])
def test_log_snr_and_karras_grids(objective, spacing):
    diffusion = Diffusion(objective, 'linear')
    ts, alphas, sigmas = diffusion.sampling_schedule(10, spacing)
    snr = (alphas / sigmas).log()
    # strictly from noise to data
    assert (snr[1:] > snr[:-1]).all()
    assert sigmas[-1] == 0 and alphas[-1] == 1
    s = (sigmas / alphas)[1:-1].log()
    # uniform in log(sigma/alpha) after the start
    if spacing == 'logsnr':
        steps = s[1:] - s[:-1]
        assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-4)
    # the last model call is almost clean: no over-shrinking
    assert (sigmas / alphas)[-2] < 0.011


def test_default_sampler_error_falls_with_nfe_and_beats_diffusers_default():
    """bench_samplers.py's Gaussian unit check: data ~ N(MU, S^2) has a closed-form probability-flow
    ODE end point. DPM-Solver++ 2M on log-SNR-uniform steps (the default before UniPC) is at most a
    third of the error of diffusers' DPMSolverMultistepScheduler with its default config at 10 and
    20 NFE."""
    from bench_gaussian import solver_errors

    rows = {(m, name.split(' (')[0]): errs for m, name, errs in solver_errors(nfes=(10, 20, 50))}
    for model in ('vp', 'flow'):
        ours = rows[(model, 'dpm++2 logsnr')]
        assert ours[2] < ours[1] < ours[0] < 0.03
        assert rows[(model, 'dpm++3 logsnr')][1] < rows[(model, 'dpm++1 logsnr')][1]
    ref = rows[('vp', 'diffusers DPMSolverMultistep')]
    # same algorithm, same grid
    assert rows[("vp", "dpm++2 linspace")] == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert (
        rows[('vp', 'dpm++2 logsnr')][0] <= ref[0] / 3
        and rows[('vp', 'dpm++2 logsnr')][1] <= ref[1] / 3
    )


# -----------------------------------------------------------------------------
# UniPC (Zhao et al. 2023) against diffusers' UniPCMultistepScheduler (predict_x0=True,
# disable_corrector=[],
# lower_order_final=True: its defaults), in float64 on the same grid, driven by the same exact
# denoiser.


def run_unipc_diffusers(sched, x, model, times):
    """diffusers' UniPC, the model called at our `times` (sched.sigmas set by the caller). Its step
    to sigma = 0 is order 1, which returns the last data prediction exactly,
    sched.model_outputs[-1]; that is what we compare with, because diffusers' bh1 makes it NaN: B(h)
    = h = inf times an empty sum, -inf * 0."""
    for t, time in zip(sched.timesteps, times):
        out = sched.step(model(x, time), t, x).prev_sample
        x = out
    if sched.config.solver_type == 'bh2':
        # ... as it is when diffusers computes it
        assert torch.equal(out, sched.model_outputs[-1])
    return sched.model_outputs[-1]


@pytest.mark.parametrize(
    'schedule, prediction, order, variant, steps, spacing',
    [
        ('linear', 'eps', 2, 'bh2', 10, 'linspace'),
        ('linear', 'eps', 3, 'bh1', 10, 'linspace'),
        ('linear', 'eps', 1, 'bh2', 5, 'linspace'),
        ('linear', 'eps', 3, 'bh2', 20, 'trailing'),
        ('cosine', 'v', 2, 'bh2', 10, 'linspace'),
        ('cosine', 'v', 3, 'bh1', 20, 'trailing'),
        ('cosine', 'v', 2, 'bh1', 5, 'linspace'),
    ],
)
def test_unipc_matches_diffusers_vp(schedule, prediction, order, variant, steps, spacing):
    # our 'linspace' and 'trailing' are diffusers' timestep_spacing of the same name: the same
    # integer times
    diffusion = Diffusion('vp', schedule, prediction, 1000)
    sched = diffusers.UniPCMultistepScheduler(
        beta_schedule=BETAS[schedule],
        beta_start=1e-4,
        beta_end=0.02,
        solver_order=order,
        solver_type=variant,
        prediction_type={'eps': 'epsilon', 'v': 'v_prediction'}[prediction],
        timestep_spacing=spacing,
    )
    x = noise(torch.float64)
    ours, nfe = sample_loop(
        net(diffusion, prediction), x, diffusion, steps, 'unipc', order, spacing, variant=variant
    )
    sched.set_timesteps(steps)
    float64_sigmas(sched, diffusion)
    ref = run_unipc_diffusers(sched, x, net(diffusion, prediction), sched.timesteps.tolist())
    assert nfe == steps
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    'order, spacing', [(1, 'linspace'), (2, 'linspace'), (2, 'logsnr'), (2, 'karras')]
)
def test_unipc_matches_diffusers_flow(order, spacing):
    # diffusers' own flow grid is linspace(1, 1/1000) and starts at 1 - 1e-6; ours is passed in
    # (sigmas=) and then set exactly, in float64, starting at pure noise t = 1 (lambda = -inf).
    # There diffusers' bh1 and order 3 are NaN (-inf * 0; a solve with an infinite r), so it is bh2
    # at order <= 2 here; order 3 is checked below
    diffusion = Diffusion('flow')
    steps = 10
    ts, _, _ = diffusion.sampling_schedule(steps, spacing)
    sched = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type='flow_prediction', flow_shift=1.0, solver_order=order
    )
    sched.set_timesteps(sigmas=ts.numpy())
    # flow: sigma = t
    sched.sigmas = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    x = noise(torch.float64)
    ours, _ = sample_loop(net(diffusion), x, diffusion, steps, 'unipc', order, spacing)
    ref = run_unipc_diffusers(sched, x, net(diffusion), ts.tolist())
    assert (ours - ref).abs().max().item() <= 1e-5


def unipc_on(diffusion, ts, model, x, order, variant, lam0=None):
    """Our sample_unipc() on the times ts directly (sample_loop's grids start at pure noise;
    diffusers' flow grid does not); lam0: replace the start's lambda."""
    alphas, sigmas = (
        torch.cat([v, end])
        for v, end in zip(diffusion.alpha_sigma(ts), (torch.ones(1), torch.zeros(1)))
    )
    A, S, lam = alphas.tolist(), sigmas.tolist(), (alphas.log() - sigmas.log()).tolist()
    lam[0] = lam[0] if lam0 is None else lam0
    x0_at = lambda x, i: diffusion.to_x0(model(x, ts[i].item()), x, A[i], S[i])
    return sample_unipc(x0_at, x, lam, A, S, order, variant)


@pytest.mark.parametrize('variant', ['bh1', 'bh2'])
def test_unipc_flow_order_3_on_diffusers_own_grid(variant):
    diffusion = Diffusion('flow')
    sched = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type='flow_prediction',
        flow_shift=1.0,
        solver_order=3,
        solver_type=variant,
    )
    sched.set_timesteps(12)
    # 1 - 1e-6, then linspace(1, 1/1000) in float32, as diffusers has them
    ts = sched.sigmas[:-1].double()
    sched.sigmas = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    x = noise(torch.float64)
    ours = unipc_on(diffusion, ts, net(diffusion), x, 3, variant)
    ref = run_unipc_diffusers(sched, x, net(diffusion), ts.tolist())
    assert (ours - ref).abs().max().item() <= 1e-5


def test_unipc_pure_noise_start_is_the_limit():
    # at lambda = -inf (flow's t = 1) unipc drops the start from its polynomial fits; that must be
    # the limit of a start at ever lower lambda (bh2: bh1's B(h) = h has no finite limit there, see
    # unipc_update). Its effect decays like 1/|lambda_0|: -13.8 (diffusers' 1 - 1e-6) is still 3e-4
    # away, -1e6 must be ~1e-8
    diffusion = Diffusion('flow')
    ts, _, _ = diffusion.sampling_schedule(10, 'logsnr')
    x = noise(torch.float64)
    exact = unipc_on(diffusion, ts, net(diffusion), x, 3, 'bh2')
    gaps = [
        (unipc_on(diffusion, ts, net(diffusion), x, 3, 'bh2', lam0) - exact).abs().max().item()
        for lam0 in (-1e2, -1e4, -1e6)
    ]
    assert gaps[0] < 1e-4 and gaps[1] < 1e-6 and gaps[2] < 1e-8, gaps


def test_unipc_bad_variant_is_one_line():
    diffusion = Diffusion('flow')
    one_line_exit(
        lambda: sample_loop(net(diffusion), noise(), diffusion, 3, 'unipc', variant='bh3'), 'bh3'
    )


# -----------------------------------------------------------------------------
# Explicit grids, solver matrices, and tune_solver


@pytest.mark.parametrize('objective', ['vp', 'flow'])
@pytest.mark.parametrize('sampler', ['dpm++', 'unipc'])
def test_explicit_grid_is_the_named_grid(objective, sampler):
    diffusion = Diffusion(objective, 'linear', 'eps')
    ts, _, _ = diffusion.sampling_schedule(8, 'logsnr')
    x = noise(torch.float64)
    named, _ = sample_loop(net(diffusion), x, diffusion, 8, sampler, 3, 'logsnr')
    assert torch.equal(sample_loop(net(diffusion), x, diffusion, 8, sampler, 3, ts)[0], named)
    assert torch.equal(
        sample_loop(net(diffusion), x, diffusion, 8, sampler, 3, ts.tolist())[0], named
    )


@pytest.mark.parametrize(
    'objective, grid',
    [
        ('vp', [999, 500]),
        ('vp', [999, 500, 500]),
        ('vp', [900, 500, 0]),
        ('vp', [999, 500, -0.5]),
        ('vp', [999, float('nan'), 0]),
        ('vp', [999, 1000, 0]),
        ('flow', [1, 0.5, 0]),
        ('flow', [0.9, 0.5, 0.1]),
    ],
)
def test_bad_explicit_grid_is_one_line(objective, grid):
    diffusion = Diffusion(objective, 'linear', 'eps')
    one_line_exit(
        lambda: diffusion.sampling_schedule(3, grid), 'explicit spacing', '3 strictly decreasing'
    )


MEANS = torch.tensor([[0.6, -0.4, 0.2, 0.5], [-0.5, 0.3, -0.6, -0.2]], dtype=torch.float64)
SD = 0.15


def mixture_net(diffusion):
    """The exact denoiser of an even mixture of N(MEANS[j], SD^2 I) in 4 dims: E[x0 | x_t] is each
    component's Gaussian posterior mean (bench_samplers.gaussian_x0) weighted by its responsibility
    for x_t ~ N(alpha mu_j, var I)."""

    def fn(x, t):
        alpha, sigma = (
            float(v) for v in diffusion.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        )
        var = alpha**2 * SD**2 + sigma**2
        resp = (-((x[:, None] - alpha * MEANS) ** 2).sum(-1) / (2 * var)).softmax(1)
        x0 = (resp[..., None] * gaussian_x0(x[:, None], alpha, sigma, MEANS, SD)).sum(1)
        return (x - x0) / sigma if diffusion.objective == 'flow' else (x - alpha * x0) / sigma

    return fn


@pytest.mark.parametrize(
    'objective, sampler, order, variant',
    [
        (o, *s)
        for o in ('vp', 'flow')
        for s in [
            ('dpm++', 1, 'bh2'),
            ('dpm++', 2, 'bh2'),
            ('dpm++', 3, 'bh2'),
            ('unipc', 2, 'bh1'),
            ('unipc', 3, 'bh2'),
            ('ddim', 1, 'bh2'),
        ]
        + [('euler', 1, 'bh2')] * (o == 'flow')
    ],
)
def test_solver_matrix_is_the_sampler(objective, sampler, order, variant):
    """Every deterministic sampler is a fixed linear combination of the start noise and the data
    predictions: the matrix read off it (on unit vectors) samples the nonlinear mixture model as the
    sampler itself does."""
    diffusion = Diffusion(objective, 'linear', 'eps')
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 2, 3, 6):
        for spacing in ('flowtime', 'logsnr'):
            want, _ = sample_loop(
                mixture_net(diffusion),
                x,
                diffusion,
                steps,
                sampler,
                order,
                spacing,
                variant=variant,
            )
            C = solver_matrix(diffusion, steps, sampler, order, spacing, variant)
            got, nfe = sample_loop(
                mixture_net(diffusion), x, diffusion, steps, spacing=spacing, matrix=C
            )
            # no peeking ahead
            assert nfe == steps and C.shape == (steps, steps + 1) and (C.tril(1) == C).all()
            assert (got - want).abs().max() < 1e-12, (steps, spacing)
            got_list, _ = sample_loop(
                mixture_net(diffusion), x, diffusion, steps, spacing=spacing, matrix=C.tolist()
            )
            # as grids.json stores it
            assert torch.equal(got_list, got)


def test_solver_matrix_refusals_are_one_line():
    diffusion = Diffusion('flow')
    for sampler in ('heun', 'ddpm'):
        one_line_exit(lambda: solver_matrix(diffusion, 4, sampler), 'one call a step', sampler)
    one_line_exit(
        lambda: sample_loop(net(diffusion), noise(), diffusion, 3, matrix=[[1.0, 0.0]] * 2),
        '2 rows',
        '3 steps',
    )


# ~600 tiny solver runs: OpenMP threads fighting over 2 cores cost 50x
@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('objective', ['vp', 'flow'])
def test_tune_solver_beats_its_start_on_held_out_noise(objective):
    """Fitted on 256 noise samples against a converged solve, selected on 256 others and checked on
    512 more, the 5-step solver starts exactly as the default (UniPC-3, flowtime), is kept (it wins
    on the checked noise), and at least halves the error on 256 samples it saw in none of them."""
    diffusion = Diffusion(objective, 'linear', 'eps')
    model, steps = mixture_net(diffusion), 5
    x, x_val, held_out, x_check = (
        torch.randn(n, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s, n in ((0, 256), (1, 256), (2, 256), (3, 512))
    )
    C, info = tune_solver(model, x, x_val, diffusion, steps, iters=150, x_check=x_check)
    assert info['used'] and info['val_error'] < info['val_start_error']
    assert info['check_error'] < info['check_start_error'] and info['check_ratio_hi'] < 1
    # the reference is converged
    assert info['ref_change'] < 0.02 * info['start_error']

    def error(x, matrix=None):
        ref = sample_loop(model, x, diffusion, 200, 'unipc', 3, 'logsnr')[0]
        out = sample_loop(model, x, diffusion, steps, spacing='flowtime', matrix=matrix)[0]
        return (out - ref).pow(2).mean().sqrt().item()

    assert error(x) == pytest.approx(info['start_error'], rel=1e-9) and error(
        x, C
    ) == pytest.approx(info['error'], rel=1e-6)
    # not just fitted to x
    assert error(held_out, C) <= 0.5 * error(held_out)
    print(
        f"{objective}: fit {info['start_error']:.3e} -> {info['error']:.3e}, held out "
        f"{error(held_out):.3e} -> {error(held_out, C):.3e}, ref change {info['ref_change']:.1e}"
    )


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('objective', ['vp', 'flow'])
def test_tune_solver_keeps_its_best_on_held_out_noise_not_its_last(objective):
    """Fitted on 4 samples, the solver overfits them: its error on the checked noise falls, then
    rises again by the last step. What it returns is the iterate best on the checked noise, not
    the last one, nor the best on the noise it was fitted to."""
    diffusion = Diffusion(objective, 'linear', 'eps')
    model = mixture_net(diffusion)
    x, x_val = (
        torch.randn(4, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in (0, 1)
    )
    # checked on the selection noise itself, 50 times over (one sample far off then costs less
    # than the win): this test is of the selection, not of the check
    C, info = tune_solver(
        model, x, x_val, diffusion, 5, iters=60, lr=3e-2, x_check=x_val.repeat(50, 1)
    )
    val = info['val_errors']
    # the case this test is for: the last iterate is clearly worse than an earlier one
    assert val[-1] > 1.1 * min(val) and info['used']
    ref = sample_loop(model, x_val, diffusion, 200, 'unipc', 3, 'logsnr')[0]
    out = sample_loop(model, x_val, diffusion, 5, spacing='flowtime', matrix=C)[0]
    got = (out - ref).pow(2).mean().sqrt().item()
    assert got == pytest.approx(min(val), rel=1e-6) and info['val_error'] == min(val)


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('objective', ['vp', 'flow'])
def test_tune_solver_falls_back_where_fitting_does_not_win(objective):
    """A fit that never beats the untuned solver on the checked noise (here: a step size that
    throws every iterate off) is not used: the untuned solver's matrix comes back, exactly."""
    diffusion = Diffusion(objective, 'linear', 'eps')
    x, x_val = (
        torch.randn(64, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in (0, 1)
    )
    C, info = tune_solver(
        mixture_net(diffusion), x, x_val, diffusion, 5, iters=10, lr=1.0, x_check=x_val
    )
    assert min(info['val_errors'][1:]) > info['val_errors'][0]
    assert not info['used'] and torch.equal(C, solver_matrix(diffusion, 5))
    assert info['val_error'] == info['val_start_error']


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('objective', ['vp', 'flow'])
def test_tune_solver_rejects_a_fit_that_loses_on_its_check_noise(objective):
    """A fit that wins on the noise its iterate was selected on but loses on the check noise (here:
    the samples of a pool on which this very fit is worse than the untuned solver) is not kept: the
    untuned solver's matrix comes back, exactly, and both check errors are recorded."""
    diffusion = Diffusion(objective, 'linear', 'eps')
    model = mixture_net(diffusion)
    x, x_val, pool = (
        torch.randn(n, 4, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s, n in ((0, 8), (1, 8), (2, 512))
    )
    fit = lambda x_check: tune_solver(
        model, x, x_val, diffusion, 5, iters=40, lr=1e-2, x_check=x_check
    )
    # checked on its selection noise (50 times over: one sample far off costs less than the win)
    C, info = fit(x_val.repeat(50, 1))
    assert info['used'] and info['val_error'] < info['val_start_error']
    ref = sample_loop(model, pool, diffusion, 200, 'unipc', 3, 'logsnr')[0]
    err = lambda m: sample_loop(model, pool, diffusion, 5, spacing='flowtime', matrix=m)[0] - ref
    worse = err(C).pow(2).sum(1) > err(solver_matrix(diffusion, 5)).pow(2).sum(1)
    assert worse.sum() >= 8
    # the same fit (the same noise, the same steps), checked where it loses
    C2, info2 = fit(pool[worse][:8])
    assert info2['val_error'] == info['val_error'] and info2['val_error'] < info2['val_start_error']
    assert info2['check_error'] > info2['check_start_error'] and not info2['used']
    assert torch.equal(C2, solver_matrix(diffusion, 5)) and 'not below 1' in info2['why']


def test_fit_verdict_wants_a_sure_win_that_one_bad_sample_would_not_undo():
    """fit_verdict, on per-sample squared errors (fitted, untuned) from the same noise: a clear win
    is kept; a win by chance (half the samples better, half worse by as much) is not; nor a sure
    win on the bulk that is smaller than one sample as bad as the worst seen (one sample in
    another mode, the same in both)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(400, generator=g, dtype=torch.float64) + 0.5
    assert fit_verdict(0.5 * base, base)[0]
    coin = torch.where(torch.arange(400) % 2 == 0, 0.9, 1.1).double()
    kept, why, stats = fit_verdict(coin * base, base)
    assert not kept and stats['check_ratio_hi'] >= 1 and 'not below 1' in why
    start, fit = base.clone(), 0.95 * base
    start[7] = fit[7] = 40.0
    kept, why, stats = fit_verdict(fit, start)
    assert not kept and stats['check_ratio_hi'] < 1 and 'far off' in why
    # the same without the sample in another mode: kept, unless one far off is worth more than
    # the whole win (400 samples * 0.05 * ~1 < 40)
    start[7] = fit[7] = 1.0
    assert fit_verdict(fit, start)[0]
    kept, why, stats = fit_verdict(fit, start, far=40.0)
    assert not kept and stats['check_one_more'] > 1 and 'far off' in why


@pytest.mark.parametrize(
    'objective,schedule', [('flow', 'cosine'), ('vp', 'linear'), ('vp', 'cosine')]
)
def test_flowtime_grid_is_uniform_in_flow_time(objective, schedule):
    """'flowtime': sigma / (alpha + sigma), a flow model's t, falls in equal steps from pure noise
    to clean on every objective (a flow model's 'linspace'); the vp start is its last training
    step."""
    d = Diffusion(objective, schedule, 'eps')
    t, alpha, sigma = d.sampling_schedule(8, 'flowtime')
    u = sigma / (alpha + sigma)
    assert t[0] == (1.0 if objective == 'flow' else d.T - 1)
    torch.testing.assert_close(
        u[1:], torch.linspace(1, 0, 9, dtype=torch.float64)[1:], rtol=0, atol=1e-9
    )
    if objective == 'flow':
        assert torch.equal(t, d.sampling_schedule(8, 'linspace')[0])


def test_unnamed_solver_settings_are_the_objectives_default():
    from samplers import default_solver

    d = Diffusion('vp', 'linear', 'eps')
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # any deterministic model
    net = lambda x, t: 0.5 * x
    out = sample_loop(net, x, d, 5)[0]
    assert torch.equal(out, sample_loop(net, x, d, 5, 'unipc', 3, 'flowtime')[0])
    assert torch.equal(
        sample_loop(net, x, d, 30)[0], sample_loop(net, x, d, 30, 'unipc', 3, 'logsnr')[0]
    )
    assert (
        default_solver('flow', 29)['spacing'] == 'flowtime'
        and default_solver('flow', 30)['spacing'] == 'logsnr'
    )
