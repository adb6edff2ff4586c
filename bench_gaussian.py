"""
The Gaussian unit check of bench_samplers.py (--gaussian=True): on data N(mu, s^2 I) the optimal
denoiser is linear and the probability-flow ODE's end point closed form, so each sampler's error is
exact. A linear ODE is too easy a referee (errors cancel, and the ranking flips with the data's std:
the mixture benchmark is the one that chose the default); kept because its answer is closed form.
"""

import torch

from diffusion import Diffusion
from samplers import sample_loop


def gaussian_x0(x_t, alpha, sigma, mu, s):
    """E[x0 | x_t] for data x0 ~ N(mu, s^2 I) and x_t = alpha x0 + sigma eps: the optimal denoiser
    in closed form, so every sampler has an exact answer to be measured against."""
    return mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x_t - alpha * mu)


def solver_errors(mu=0.3, s=0.5, nfes=(5, 10, 20, 50)):
    """The Gaussian unit check (--gaussian=True). Rows (model, sampler, [error at each NFE]): the
    RMS distance of each sampler's end point from the exact probability-flow ODE solution, which for
    Gaussian data maps the start x_T to mu + s * (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 +
    sigma_T^2)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for objective in ('vp', 'flow'):
        diffusion = Diffusion(objective, 'linear', 'eps', 1000)

        def net(x_t, t):
            a, sg = (
                float(v) for v in diffusion.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
            )
            x0 = gaussian_x0(x_t, a, sg, mu, s)
            return (x_t - x0) / sg if objective == 'flow' else (x_t - a * x0) / sg

        t0 = 1.0 if objective == 'flow' else diffusion.T - 1.0
        a, sg = (float(v) for v in diffusion.alpha_sigma(torch.tensor(t0, dtype=torch.float64)))
        exact = mu + s * (x - a * mu) / (a * a * s * s + sg * sg) ** 0.5
        rms = lambda out: (out - exact).pow(2).mean().sqrt().item()
        # time-uniform, as diffusers' DDIM default
        uniform = 'leading' if objective == 'vp' else 'linspace'
        configs = [
            ('dpm++', 2, 'logsnr'),
            ('dpm++', 1, 'logsnr'),
            ('dpm++', 3, 'logsnr'),
            ('dpm++', 2, 'karras'),
            ('dpm++', 3, 'karras'),
            ('dpm++', 2, 'linspace'),
            ('ddim', 1, uniform),
        ]
        if objective == 'flow':
            configs += [('euler', 1, 'linspace'), ('heun', 2, 'karras')]
        for sampler, order, spacing in configs:
            errs = []
            for nfe in nfes:
                steps = (nfe + 1) // 2 if sampler == 'heun' else nfe
                errs.append(
                    rms(sample_loop(net, x.clone(), diffusion, steps, sampler, order, spacing)[0])
                )
            name = f"{sampler}{order if sampler == 'dpm++' else ''} {spacing}" + (
                ' (our default)' if (sampler, order, spacing) == ('dpm++', 2, 'logsnr') else ''
            )
            rows.append((objective, name, errs))
        if objective == 'vp':
            try:
                import diffusers
            except ImportError:
                rows.append(
                    (
                        'vp',
                        'diffusers DPMSolverMultistep default: not installed',
                        [float('nan')] * len(nfes),
                    )
                )
                continue
            errs = []
            for nfe in nfes:
                # its defaults: linear betas, 2M, linspace
                sched = diffusers.DPMSolverMultistepScheduler()
                sched.set_timesteps(nfe)
                out = x.clone()
                for t in sched.timesteps:
                    out = sched.step(net(out, float(t)), t, out).prev_sample
                errs.append(rms(out))
            rows.append(('vp', 'diffusers DPMSolverMultistep (default config)', errs))
    return rows


def print_solver_table(nfes=(5, 10, 20, 50)):
    rows = solver_errors(nfes=nfes)
    width = max(len(r[1]) for r in rows)
    print(f"{'model':<6} {'sampler':<{width}}  " + '  '.join(f"{f'{n} NFE':>9}" for n in nfes))
    for objective, name, errs in rows:
        print(f"{objective:<6} {name:<{width}}  " + '  '.join(f"{e:9.2e}" for e in errs))
