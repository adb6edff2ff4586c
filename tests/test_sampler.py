"""Samplers against diffusers' reference schedulers, on a model whose answer is known in closed form:
for data x0 ~ N(MU, S^2 I) the optimal denoiser E[x0 | x_t] is linear, so the 'network' below is exact and
any difference between two samplers is a difference in the samplers."""
import pytest
import torch

from diffusion import Diffusion, sample_loop, threshold_x0
from bench import gaussian_x0
from conftest import require

diffusers = require('diffusers')  # skips without diffusers; fails instead in CI (conftest.py)

MU, S = 0.3, 0.5
BETAS = {'linear': 'linear', 'cosine': 'squaredcos_cap_v2'}


def net(diffusion, prediction='eps'):
    """The exact denoiser as a 'network' with the given output type, called at objective time t."""
    def fn(x, t):
        alpha, sigma = (float(v) for v in diffusion.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        x0 = gaussian_x0(x, alpha, sigma, MU, S)
        if diffusion.objective == 'flow':
            return (x - x0) / sigma  # velocity eps - x0
        eps = (x - alpha * x0) / sigma
        return {'eps': eps, 'v': alpha * eps - sigma * x0, 'x0': x0}[prediction]
    return fn


def noise(dtype=torch.float32, seed=0):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def float64_sigmas(sched, diffusion):
    """diffusers keeps its sigmas in float32. Near pure noise on the cosine schedule alpha is ~5e-5 and
    eps -> x0 divides by it, so float32 rounding of the schedule alone moves results by ~1e-3; to compare
    the algorithms, give diffusers the same schedule in float64 (its own formula)."""
    ac = diffusion.alphas_cumprod
    sched.sigmas = torch.cat([((1 - ac) / ac).sqrt()[sched.timesteps], torch.zeros(1, dtype=torch.float64)])


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
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule='linear', beta_start=1e-4, beta_end=0.02,
                                                  solver_order=2, algorithm_type='dpmsolver++')
    x = noise()
    ours, nfe = sample_loop(net(diffusion), x, diffusion, steps, 'dpm++', order=2, spacing='linspace')
    ref = run_diffusers(sched, x, net(diffusion), steps)
    assert nfe == steps
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('steps, spacing', [(5, 'linspace'), (10, 'linspace'), (20, 'linspace'), (50, 'linspace'),
                                            (10, 'trailing'), (20, 'trailing')])
@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_dpm_solver_pp_orders(schedule, order, steps, spacing, prediction):
    diffusion = Diffusion('vp', schedule, prediction, 1000)
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule=BETAS[schedule], beta_start=1e-4, beta_end=0.02, solver_order=order, algorithm_type='dpmsolver++',
        prediction_type={'eps': 'epsilon', 'v': 'v_prediction'}[prediction], timestep_spacing=spacing,
        final_sigmas_type='zero', lower_order_final=True)
    x = noise(torch.float64)
    ours, _ = sample_loop(net(diffusion, prediction), x, diffusion, steps, 'dpm++', order=order, spacing=spacing)
    ref = run_diffusers(sched, x, net(diffusion, prediction), steps, float64_from=diffusion)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('steps, spacing', [(10, 'leading'), (50, 'leading'), (20, 'trailing')])
@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
def test_ddim(schedule, steps, spacing, eta):
    diffusion = Diffusion('vp', schedule, 'eps', 1000)
    sched = diffusers.DDIMScheduler(beta_schedule=BETAS[schedule], beta_start=1e-4, beta_end=0.02, clip_sample=False,
                                    set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=0)
    x = noise(torch.float64)
    ours, _ = sample_loop(net(diffusion), x, diffusion, steps, 'ddim', eta=eta, spacing=spacing,
                          generator=torch.Generator().manual_seed(7))
    sched.alphas_cumprod = diffusion.alphas_cumprod  # float64 schedule, as above
    ref = run_diffusers(sched, x, net(diffusion), steps, eta=eta, generator=torch.Generator().manual_seed(7))
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('steps', [1000, 50])
def test_ddpm_ancestral_with_the_same_noise(schedule, steps):
    diffusion = Diffusion('vp', schedule, 'eps', 1000)
    sched = diffusers.DDPMScheduler(beta_schedule=BETAS[schedule], beta_start=1e-4, beta_end=0.02, clip_sample=False,
                                    variance_type='fixed_small', timestep_spacing='leading', steps_offset=0)
    sched.alphas_cumprod = diffusion.alphas_cumprod
    sched.betas = 1 - diffusion.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), diffusion.alphas_cumprod[:-1]])
    x = noise(torch.float64)
    ours, _ = sample_loop(net(diffusion), x, diffusion, steps, 'ddpm', spacing='leading',
                          generator=torch.Generator().manual_seed(3))
    ref = run_diffusers(sched, x, net(diffusion), steps, generator=torch.Generator().manual_seed(3))
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('steps', [5, 20])
def test_flow_euler_matches_flow_match_euler(steps):
    diffusion = Diffusion('flow')
    ts, _, _ = diffusion.sampling_schedule(steps, 'linspace')
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=ts.float().numpy())  # the same times; diffusers appends the final 0
    x = noise()
    ours, nfe = sample_loop(net(diffusion), x, diffusion, steps, 'euler', spacing='linspace')
    ref = x
    for sigma, t in zip(sched.sigmas[:-1], sched.timesteps):
        ref = sched.step(net(diffusion)(ref, sigma.item()), t, ref).prev_sample
    assert nfe == steps
    assert (ours - ref).abs().max().item() <= 1e-5


def test_dynamic_thresholding_matches_diffusers():
    sched = diffusers.DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                                  sample_max_value=1.5)
    x0 = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(threshold_x0(x0, 0.9, 1.5), sched._threshold_sample(x0.clone()), rtol=0, atol=1e-6)
    assert threshold_x0(x0, 0.9, 1.5).abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize('schedule, name', [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')])
def test_schedules_match_diffusers(schedule, name):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=1e-4, beta_end=0.02)
    ours = Diffusion('vp', schedule, 'eps', 1000).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('objective', ['vp', 'flow'])
@pytest.mark.parametrize('spacing', ['logsnr', 'karras'])
def test_log_snr_and_karras_grids(objective, spacing):
    diffusion = Diffusion(objective, 'linear')
    ts, alphas, sigmas = diffusion.sampling_schedule(10, spacing)
    snr = (alphas / sigmas).log()
    assert (snr[1:] > snr[:-1]).all()  # strictly from noise to data
    assert sigmas[-1] == 0 and alphas[-1] == 1
    s = (sigmas / alphas)[1:-1].log()
    if spacing == 'logsnr':  # uniform in log(sigma/alpha) after the start
        steps = s[1:] - s[:-1]
        assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-4)
    assert (sigmas / alphas)[-2] < 0.011  # the last model call is almost clean: no over-shrinking


def test_default_sampler_error_falls_with_nfe_and_beats_diffusers_default():
    """bench.py's exact-answer table: data ~ N(MU, S^2) has a closed-form probability-flow ODE end point.
    Our default (DPM-Solver++ 2M, log-SNR-uniform steps) is at most a third of the error of diffusers'
    DPMSolverMultistepScheduler with its default config at 10 and 20 NFE."""
    from bench import solver_errors
    rows = {(m, name.split(' (')[0]): errs for m, name, errs in solver_errors(nfes=(10, 20, 50))}
    for model in ('vp', 'flow'):
        ours = rows[(model, 'dpm++2 logsnr')]
        assert ours[2] < ours[1] < ours[0] < 0.03
        assert rows[(model, 'dpm++3 logsnr')][1] < rows[(model, 'dpm++1 logsnr')][1]
    ref = rows[('vp', 'diffusers DPMSolverMultistep')]
    assert rows[("vp", "dpm++2 linspace")] == pytest.approx(ref, rel=1e-6, abs=1e-6)  # same algorithm, same grid
    assert rows[('vp', 'dpm++2 logsnr')][0] <= ref[0] / 3 and rows[('vp', 'dpm++2 logsnr')][1] <= ref[1] / 3
