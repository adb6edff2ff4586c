"""Samplers against diffusers' reference implementations, on a model whose answer is known in closed form."""
import numpy as np
import pytest
import torch

from model import Diffusion
from sample import dpm_solver_pp

diffusers = pytest.importorskip('diffusers')

MU, S = 0.3, 0.5  # data ~ N(MU, S^2 I)


def gaussian_x0(x_t, alpha, sigma):
    """The exact E[x0 | x_t] for Gaussian data: the optimal denoiser, so every sampler has a true answer."""
    return MU + alpha * S ** 2 / (alpha ** 2 * S ** 2 + sigma ** 2) * (x_t - alpha * MU)


def eps_model(diffusion):
    """An eps-prediction 'network' for a VP schedule, evaluated at discrete timestep t."""
    def fn(x, t):
        alpha, sigma = (float(v) for v in diffusion.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        return (x - alpha * gaussian_x0(x, alpha, sigma)) / sigma
    return fn


def diffusers_dpm(x, diffusion, steps, order, schedule, float64=False):
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.T, beta_schedule={'linear': 'linear', 'cosine': 'squaredcos_cap_v2'}[schedule],
        beta_start=1e-4, beta_end=0.02, solver_order=order, prediction_type='epsilon', algorithm_type='dpmsolver++',
        timestep_spacing='linspace', final_sigmas_type='zero', lower_order_final=True)
    sched.set_timesteps(steps)
    if float64:
        # diffusers keeps its sigmas in float32. Near pure noise on the cosine schedule alpha is ~5e-5, and
        # eps -> x0 divides by it, so float32 rounding of the schedule alone moves the result by ~1e-3. To
        # compare the solvers themselves, give diffusers the same schedule in float64 (its own formula).
        ac = diffusion.alphas_cumprod
        sched.sigmas = torch.cat([((1 - ac) / ac).sqrt()[sched.timesteps], torch.zeros(1, dtype=torch.float64)])
    model = eps_model(diffusion)
    for t in sched.timesteps:
        x = sched.step(model(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize('steps', [5, 10, 20])
def test_dpm_solver_pp_2m_matches_diffusers_float32(steps):
    """Unmodified diffusers in float32 on the linear (DDPM) schedule."""
    diffusion = Diffusion('vp', 'linear', 'eps', 1000)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = dpm_solver_pp(eps_model(diffusion), x.clone(), diffusion, steps, order=2)
    ref = diffusers_dpm(x.clone(), diffusion, steps, 2, 'linear')
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('steps', [5, 10, 20, 50])
@pytest.mark.parametrize('order', [1, 2])
def test_dpm_solver_pp_matches_diffusers_float64(schedule, steps, order):
    diffusion = Diffusion('vp', schedule, 'eps', 1000)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = dpm_solver_pp(eps_model(diffusion), x.clone(), diffusion, steps, order=order)
    ref = diffusers_dpm(x.clone(), diffusion, steps, order, schedule, float64=True)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize('schedule, name', [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')])
def test_schedules_match_diffusers(schedule, name):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=1e-4, beta_end=0.02)
    ours = Diffusion('vp', schedule, 'eps', 1000).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-8)
