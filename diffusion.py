"""
The diffusion math and the samplers, in one place: how x_t is made from data, what the network is trained
to predict, how x0 is read back from its output, and how samples are integrated from noise. train.py,
sample.py and bench.py import it; it imports no network (a denoiser is any model_fn(x, t)).

References:
- DDPM: Ho et al. (2020); cosine schedule: Nichol & Dhariwal, "Improved DDPM" (2021).
- v-prediction: Salimans & Ho, "Progressive Distillation" (2022).
- Rectified flow / flow matching: Liu et al. (2022), Lipman et al. (2022); logit-normal t: SD3, Esser et al. (2024).
- DPM-Solver++: Lu et al. (2022); DDIM: Song et al. (2021); CFG: Ho & Salimans (2022).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

SAMPLERS = ('dpm++', 'ddim', 'ddpm', 'euler', 'heun')
SPACINGS = ('logsnr', 'karras', 'linspace', 'leading', 'trailing')

# -----------------------------------------------------------------------------
# Diffusion math: how x_t is made from data, what the network is trained to predict, how x0 is read
# back from its output. Every objective is written as x_t = alpha_t * x0 + sigma_t * noise, which is
# all a sampler needs (DPM-Solver++ works in log-SNR lambda = log(alpha / sigma)).

class Diffusion:
    def __init__(self, objective='flow', schedule='cosine', prediction='v', num_timesteps=1000):
        assert objective in ('flow', 'vp'), f"objective must be 'flow' or 'vp', got {objective!r}"
        assert prediction in ('eps', 'v', 'x0'), f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}"
        self.objective, self.schedule, self.prediction, self.T = objective, schedule, prediction, num_timesteps
        if objective == 'vp':
            self.alphas_cumprod = vp_alphas_cumprod(schedule, num_timesteps)

    def alpha_sigma(self, t):
        """Signal and noise scales at time t (a float64 tensor): flow t in [0, 1]; vp t in [0, T-1]."""
        if self.objective == 'flow':  # straight line from data (t=0) to noise (t=1)
            return 1 - t, t
        ac = self.alphas_cumprod.to(t.device)
        lo = t.floor().long().clamp(0, self.T - 1)  # linear interpolation between discrete steps
        a = ac[lo] + (t - lo) * (ac[(lo + 1).clamp(max=self.T - 1)] - ac[lo])
        return a.sqrt(), (1 - a).sqrt()

    def model_time(self, t):
        """The timestep value the network sees, on a 0..1000 scale for both objectives."""
        return t * 1000 if self.objective == 'flow' else t

    def sample_t(self, n, generator=None, device='cpu'):
        if self.objective == 'flow':  # logit-normal(0, 1): more weight on the middle times (SD3 sec. 3.1)
            return torch.sigmoid(torch.randn(n, generator=generator, device=device, dtype=torch.float64))
        return torch.randint(0, self.T, (n,), generator=generator, device=device).double()

    def loss(self, model, x0, y, t, noise, min_snr_gamma=0.0, text=None):
        """Mean squared error of the network's prediction; t and noise are drawn by the caller.
        min_snr_gamma > 0: Min-SNR-gamma weighting (Hang et al. 2023), see min_snr_weight.
        text: the captions' (states, mask, pooled) for a text-conditional model, else None."""
        alpha, sigma = (s.float().view(-1, 1, 1, 1) for s in self.alpha_sigma(t))
        x_t = alpha * x0 + sigma * noise
        out = model(x_t, self.model_time(t).float(), y, text)
        if self.objective == 'flow':
            target = noise - x0  # velocity dx_t/dt
        else:
            target = {'eps': noise, 'v': alpha * noise - sigma * x0, 'x0': x0}[self.prediction]
        if not min_snr_gamma:
            return F.mse_loss(out.float(), target)
        per_example = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (per_example * self.min_snr_weight(t, min_snr_gamma)).mean()

    def min_snr_weight(self, t, gamma):
        """Per-example weight so that the loss is min(SNR, gamma) * |x0 error|^2 whatever the network predicts:
        the error of each output type is k * (x0 error) with k^2 = SNR (eps), 1/sigma^2 (v, and flow's
        velocity: x0 = x_t - t v), 1 (x0); the weight is min(SNR, gamma) / k^2. High-SNR (nearly clean) steps
        stop dominating, which the paper shows speeds up convergence ~3x."""
        alpha, sigma = self.alpha_sigma(t)
        snr = (alpha / sigma) ** 2
        k2 = {'eps': snr, 'v': 1 / sigma ** 2, 'x0': torch.ones_like(snr)}['v' if self.objective == 'flow' else self.prediction]
        return (snr.clamp(max=gamma) / k2).float()

    def to_x0(self, out, x_t, alpha, sigma):
        """The data prediction implied by the network output (what DPM-Solver++ integrates)."""
        if self.objective == 'flow':
            return x_t - sigma * out  # x0 = x_t - t * v
        if self.prediction == 'eps':
            return (x_t - sigma * out) / alpha
        if self.prediction == 'v':
            return alpha * x_t - sigma * out
        return out

    def edm_sigma(self, t):
        """sigma/alpha, the noise level of x/alpha (EDM's sigma); +inf at pure noise."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_from_edm_sigma(self, s):
        """Inverse of edm_sigma. vp: alpha_bar = 1 / (1 + s^2), found on the same piecewise-linear alpha_bar(t)
        that alpha_sigma uses, so the round trip is exact."""
        if self.objective == 'flow':
            return s / (1 + s)
        ac = self.alphas_cumprod.flip(0).numpy()  # increasing, for np.interp
        t = np.interp((1 / (1 + s ** 2)).numpy(), ac, np.arange(self.T - 1, -1, -1, dtype=np.float64))
        return torch.from_numpy(t)

    def sampling_schedule(self, steps, spacing='linspace'):
        """Times for a `steps`-step sampler, from pure noise to clean data: the model is evaluated at
        t[0..steps-1]; alpha/sigma have steps+1 entries, the last one clean (alpha=1, sigma=0).
        spacing: 'linspace', 'leading', 'trailing': uniform in time, exactly as diffusers spaces them;
        'logsnr': uniform in log-SNR (DPM-Solver's choice); 'karras': EDM's rho=7 spacing of sigma/alpha.
        The last two span sigma/alpha from min(start, 80) to s_min (0.002, or the first training step), so the final step to
        clean data starts almost clean: a time-uniform grid's last step returns the posterior mean at a
        large noise level, which over-shrinks samples (towards the mean)."""
        T = self.T
        if spacing not in ('logsnr', 'karras', 'linspace', 'leading', 'trailing'):
            raise SystemExit(f"error: unknown spacing {spacing!r}: use linspace, leading, trailing, logsnr or karras")
        if spacing in ('logsnr', 'karras'):
            t_max = 1 - 1e-4 if self.objective == 'flow' else T - 1.0  # flow: t=1 has infinite sigma/alpha
            t_min = 0.002 / 1.002 if self.objective == 'flow' else 0.0
            s_max, s_min = self.edm_sigma(torch.tensor([t_max, t_min], dtype=torch.float64))
            s_max = s_max.clamp(max=80.0)  # EDM's sigma_max: above it no signal of [-1, 1] data is visible,
            # so grid points there are wasted; the first call stays at the true start, pure noise
            i = torch.linspace(0, 1, steps, dtype=torch.float64)
            if spacing == 'logsnr':
                s = (s_max.log() + i * (s_min.log() - s_max.log())).exp()
            else:
                rho = 7.0
                s = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            t = self.t_from_edm_sigma(s)
            t[0] = 1.0 if self.objective == 'flow' else t_max  # start from pure noise
        elif self.objective == 'flow':
            t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
        elif spacing == 'linspace':  # diffusers' DPMSolverMultistepScheduler default
            t = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
        elif spacing == 'leading':  # diffusers' DDIM/DDPM default
            t = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0)
        else:  # 'trailing': "Common Diffusion Noise Schedules and Sample Steps Are Flawed", table 2
            t = torch.from_numpy(np.round(np.arange(T, 0, -T / steps)) - 1).double()
        alpha, sigma = self.alpha_sigma(t)
        alpha = torch.cat([alpha, torch.ones(1, dtype=torch.float64)])
        sigma = torch.cat([sigma, torch.zeros(1, dtype=torch.float64)])
        return t, alpha, sigma


def vp_alphas_cumprod(schedule, T):
    """Cumulative signal fraction alpha_bar_t for discrete steps 0..T-1 (float64)."""
    if schedule == 'linear':  # DDPM: betas from 1e-4 to 0.02
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif schedule == 'cosine':  # iDDPM: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2), betas capped at 0.999
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}: use 'linear' or 'cosine'")
    return torch.cumprod(1 - betas, dim=0)


# -----------------------------------------------------------------------------
# Samplers

def threshold_x0(x0, ratio, max_value=1.0):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = the `ratio` quantile
    of |x0| (at least 1, at most max_value); clip x0 to [-s, s] and divide by s. For pixel-space models
    with strong guidance; off (ratio 0) by default."""
    s = x0.flatten(1).abs().float().quantile(ratio, dim=1).clamp(1, max_value).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return x0.clamp(-s, s) / s


def sample_loop(model_fn, x, diffusion, steps, sampler='dpm++', order=2, spacing='logsnr', eta=0.0,
                threshold=0.0, threshold_max=1.0, generator=None):
    """Integrate from noise x to data in `steps` steps. model_fn(x, t) returns the network output at
    objective time t (CFG already applied: one batched call). Returns (x, nfe).
      dpm++: DPM-Solver++ multistep, order 1-3 (Lu et al. 2022), data-prediction form
      ddim:  DDIM (Song et al. 2021); eta=0 deterministic, eta=1 is DDPM's ancestral sampler
      ddpm:  = ddim with eta=1
      euler, heun: the flow ODE dx/dt = v in t (flow objective only; heun uses 2 NFE per step but the last)"""
    ts, alphas, sigmas = diffusion.sampling_schedule(steps, spacing)
    A, S = alphas.tolist(), sigmas.tolist()
    nfe = 0

    def x0_at(x, i):
        nonlocal nfe
        nfe += 1
        x0 = diffusion.to_x0(model_fn(x, ts[i].item()), x, A[i], S[i])
        return threshold_x0(x0, threshold, threshold_max) if threshold else x0

    if sampler == 'dpm++':
        lam = (alphas.log() - sigmas.log()).tolist()  # log-SNR/2: -inf at pure noise, +inf when clean
        hist = []  # data predictions of the last steps, newest last
        for i in range(steps):
            hist = (hist + [x0_at(x, i)])[-3:]
            # warm up from first order; the step to sigma=0 is first order and, in short runs, the one
            # before it at most second (as in diffusers: fewer, larger steps make extrapolation unstable)
            k = min(order, len(hist), 1 if i == steps - 1 else 2 if i == steps - 2 and steps < 15 else 3)
            h = lam[i + 1] - lam[i]
            phi = np.expm1(-h)  # exp(-h) - 1
            D0 = hist[-1]
            x = (S[i + 1] / S[i]) * x - A[i + 1] * phi * D0  # exact for a constant D: DDIM
            if k >= 2:  # + the linear term of D in lambda (2M: eq. 9 of DPM-Solver++)
                r0 = (lam[i] - lam[i - 1]) / h
                D1 = (D0 - hist[-2]) / r0
                if k == 2:
                    x = x - 0.5 * A[i + 1] * phi * D1
                else:  # 3M: a quadratic in lambda through the last three predictions
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    D1_1 = (hist[-2] - hist[-3]) / r1
                    D2 = (D1 - D1_1) / (r0 + r1)
                    D1 = D1 + r0 / (r0 + r1) * (D1 - D1_1)
                    x = x + A[i + 1] * (phi / h + 1) * D1 - A[i + 1] * ((phi + h) / h ** 2 - 0.5) * D2
    elif sampler in ('ddim', 'ddpm'):
        eta = 1.0 if sampler == 'ddpm' else eta
        for i in range(steps):
            a, s, a_n, s_n = A[i], S[i], A[i + 1], S[i + 1]
            x0 = x0_at(x, i)
            eps = (x - a * x0) / s
            # variance of the posterior q(x_next | x, x0), scaled by eta^2 (DDIM eq. 16 in alpha/sigma form)
            var = eta ** 2 * (s_n / s) ** 2 * (s ** 2 - (a / a_n) ** 2 * s_n ** 2) if s_n > 0 else 0.0
            x = a_n * x0 + max(s_n ** 2 - var, 0.0) ** 0.5 * eps
            if var > 0:
                x = x + var ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif sampler in ('euler', 'heun'):
        if diffusion.objective != 'flow':
            raise SystemExit(f"error: sampler {sampler!r} integrates the flow ODE in t: use it with objective='flow'")
        for i in range(steps):
            t, t_n = S[i], S[i + 1]  # flow: sigma = t
            v = (x - x0_at(x, i)) / t
            x_next = x + (t_n - t) * v
            if sampler == 'heun' and t_n > 0:  # trapezoid: average with the slope at the Euler end point
                v_n = (x_next - x0_at(x_next, i + 1)) / t_n
                x_next = x + (t_n - t) * 0.5 * (v + v_n)
            x = x_next
    else:
        raise SystemExit(f"error: unknown sampler {sampler!r}: use dpm++, ddim, ddpm, euler or heun")
    return x, nfe


def guided(model, diffusion, y, null_class, cfg_scale, text=None, null_text=None):
    """The network with classifier-free guidance: out = uncond + s * (cond - uncond), with the conditional and
    unconditional halves in one batched forward (one network evaluation per step). A text model: text =
    the prompts' (states, mask, pooled), one per image; null_text = the empty caption's, which is the
    unconditional half (y is then the null class throughout)."""
    use_cfg = cfg_scale != 1 and (null_class > 0 or text is not None)  # unconditional: nothing to guide with
    if use_cfg:
        y = torch.cat([y, torch.full_like(y, null_class)])
        if text is not None:
            text = tuple(torch.cat([a, e.expand_as(a)]) for a, e in zip(text, null_text))

    def model_fn(x, t):
        xx = torch.cat([x, x]) if use_cfg else x
        tt = torch.full((len(xx),), diffusion.model_time(t), device=x.device)
        out = model(xx, tt, y, text).float()
        if not use_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return model_fn
