"""
The diffusion math and the samplers, in one place: how x_t is made from data, what the network is
trained to predict, how x0 is read back from its output, and how samples are integrated from noise.
train.py, sample.py and bench.py import it; it imports no network (a denoiser is any model_fn(x,
t)).

References:
- DDPM: Ho et al. (2020); cosine schedule: Nichol & Dhariwal, "Improved DDPM" (2021).
- v-prediction: Salimans & Ho, "Progressive Distillation" (2022).
- Rectified flow / flow matching: Liu et al. (2022), Lipman et al. (2022); logit-normal t: SD3,
  Esser et al. (2024).
- DPM-Solver++: Lu et al. (2022); UniPC: Zhao et al. (2023); DDIM: Song et al. (2021); CFG: Ho &
  Salimans (2022).
- Solvers fitted to a model (tune_solver): after "Bespoke Non-Stationary Solvers", Shaul et al.
  (2024).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

SAMPLERS = ('dpm++', 'unipc', 'ddim', 'ddpm', 'euler', 'heun')
SPACINGS = ('flowtime', 'logsnr', 'karras', 'linspace', 'leading', 'trailing')


def default_solver(objective, steps):
    """The solver sample_loop uses when none is named, chosen by the Gaussian-mixture benchmark
    (bench_samplers.py, README): UniPC-3 for every objective, on the 'flowtime' grid below 30 steps
    (at 5-20 NFE it leads the log-SNR grid: its coarse steps go where each sample's mode is decided)
    and on 'logsnr' from 30 (the flowtime grid's last model call, at sigma/alpha = 1/(steps-1), then
    limits it: 8x the log-SNR grid's error at 50 NFE)."""
    return dict(sampler='unipc', order=3, spacing='flowtime' if steps < 30 else 'logsnr')


# -----------------------------------------------------------------------------
# Diffusion math: how x_t is made from data, what the network is trained to predict, how x0 is read
# back from its output. Every objective is written as x_t = alpha_t * x0 + sigma_t * noise, which is
# all a sampler needs (DPM-Solver++ works in log-SNR lambda = log(alpha / sigma)).


class Diffusion:
    def __init__(self, objective='flow', schedule='cosine', prediction='v', num_timesteps=1000):
        assert objective in ('flow', 'vp'), f"objective must be 'flow' or 'vp', got {objective!r}"
        assert prediction in ('eps', 'v', 'x0'), (
            f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}"
        )
        self.objective, self.schedule, self.prediction, self.T = (
            objective,
            schedule,
            prediction,
            num_timesteps,
        )
        if objective == 'vp':
            self.alphas_cumprod = vp_alphas_cumprod(schedule, num_timesteps)

    def alpha_sigma(self, t):
        """Signal and noise scales at time t (a float64 tensor): flow t in [0, 1]; vp t in [0,
        T-1]."""
        # straight line from data (t=0) to noise (t=1)
        if self.objective == 'flow':
            return 1 - t, t
        ac = self.alphas_cumprod.to(t.device)
        # linear interpolation between discrete steps
        lo = t.floor().long().clamp(0, self.T - 1)
        a = ac[lo] + (t - lo) * (ac[(lo + 1).clamp(max=self.T - 1)] - ac[lo])
        return a.sqrt(), (1 - a).sqrt()

    def model_time(self, t):
        """The timestep value the network sees, on a 0..1000 scale for both objectives."""
        return t * 1000 if self.objective == 'flow' else t

    def sample_t(self, n, generator=None, device='cpu'):
        # logit-normal(0, 1): more weight on the middle times (SD3 sec. 3.1)
        if self.objective == 'flow':
            return torch.sigmoid(
                torch.randn(n, generator=generator, device=device, dtype=torch.float64)
            )
        return torch.randint(0, self.T, (n,), generator=generator, device=device).double()

    def loss(self, model, x0, y, t, noise, min_snr_gamma=0.0, text=None, hint=None):
        """Mean squared error of the network's prediction; t and noise are drawn by the caller.
        min_snr_gamma > 0: Min-SNR-gamma weighting (Hang et al. 2023), see min_snr_weight.
        text: the captions' (states, mask, pooled) for a text-conditional model, else None.
        hint: the control branch's hint maps, else None (a model without a branch is not even passed
        the argument)."""
        alpha, sigma = (s.float().view(-1, 1, 1, 1) for s in self.alpha_sigma(t))
        x_t = alpha * x0 + sigma * noise
        out = model(
            x_t, self.model_time(t).float(), y, text, **({} if hint is None else {'hint': hint})
        )
        if self.objective == 'flow':
            # velocity dx_t/dt
            target = noise - x0
        else:
            target = {'eps': noise, 'v': alpha * noise - sigma * x0, 'x0': x0}[self.prediction]
        if not min_snr_gamma:
            return F.mse_loss(out.float(), target)
        per_example = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (per_example * self.min_snr_weight(t, min_snr_gamma)).mean()

    def min_snr_weight(self, t, gamma, floor=0.0):
        """Per-example weight so that the loss is min(SNR, gamma) * |x0 error|^2 whatever the
        network predicts: the error of each output type is k * (x0 error) with k^2 = SNR (eps),
        1/sigma^2 (v, and flow's velocity: x0 = x_t - t v), 1 (x0); the weight is min(SNR, gamma) /
        k^2. High-SNR (nearly clean) steps stop dominating, which the paper shows speeds up
        convergence ~3x. floor: max(SNR, floor) first (progressive distillation's "truncated SNR"
        weighting is floor 1, gamma inf: Salimans & Ho, sec. 4)."""
        alpha, sigma = self.alpha_sigma(t)
        snr = (alpha / sigma) ** 2
        k2 = {'eps': snr, 'v': 1 / sigma**2, 'x0': torch.ones_like(snr)}[
            'v' if self.objective == 'flow' else self.prediction
        ]
        return (snr.clamp(min=floor, max=gamma) / k2).float()

    def to_x0(self, out, x_t, alpha, sigma):
        """The data prediction implied by the network output (what DPM-Solver++ integrates)."""
        if self.objective == 'flow':
            # x0 = x_t - t * v
            return x_t - sigma * out
        if self.prediction == 'eps':
            return (x_t - sigma * out) / alpha
        if self.prediction == 'v':
            return alpha * x_t - sigma * out
        return out

    def from_x0(self, x0, x_t, alpha, sigma):
        """The network output that to_x0 reads back as x0 (its inverse; sigma > 0): a distilled
        student's target."""
        if self.objective == 'flow':
            return (x_t - x0) / sigma
        if self.prediction == 'eps':
            return (x_t - alpha * x0) / sigma
        if self.prediction == 'v':
            return (alpha * x_t - x0) / sigma
        return x0

    def edm_sigma(self, t):
        """sigma/alpha, the noise level of x/alpha (EDM's sigma); +inf at pure noise."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_from_edm_sigma(self, s):
        """Inverse of edm_sigma. vp: alpha_bar = 1 / (1 + s^2), found on the same piecewise-linear
        alpha_bar(t) that alpha_sigma uses, so the round trip is exact."""
        if self.objective == 'flow':
            return s / (1 + s)
        # increasing, for np.interp
        ac = self.alphas_cumprod.flip(0).numpy()
        t = np.interp((1 / (1 + s**2)).numpy(), ac, np.arange(self.T - 1, -1, -1, dtype=np.float64))
        return torch.from_numpy(t)

    def sampling_schedule(self, steps, spacing='linspace'):
        """Times for a `steps`-step sampler, from pure noise to clean data: the model is evaluated
        at t[0..steps-1]; alpha/sigma have steps+1 entries, the last one clean (alpha=1, sigma=0).
        spacing: 'linspace', 'leading', 'trailing': uniform in time, exactly as diffusers spaces
        them; 'logsnr': uniform in log-SNR (DPM-Solver's choice); 'karras': EDM's rho=7 spacing of
        sigma/alpha; 'flowtime': uniform in rectified-flow time u = sigma/(alpha+sigma), i.e.
        sigma/alpha = u/(1-u), for any objective (a flow model's 'linspace'): few steps in the
        near-pure noise, and the best grid at 5-10 NFE of the mixture benchmark (bench_samplers.py)
        on every objective. The last two span sigma/alpha from min(start, 80) to s_min (0.002, or
        the first training step), so the final step to clean data starts almost clean: a
        time-uniform grid's last step returns the posterior mean at a large noise level, which
        over-shrinks samples (towards the mean). spacing may also be the `steps` times themselves
        (e.g. a stored grid): strictly decreasing, from the start (flow 1.0, vp T-1) down to above 0
        (flow) or 0 (vp)."""
        T = self.T
        # an explicit grid; a str test first: `tensor in tuple` is elementwise
        if not isinstance(spacing, str):
            t = torch.as_tensor(spacing, dtype=torch.float64).flatten()
            flow = self.objective == 'flow'
            start = 1.0 if flow else T - 1.0
            # asked positively, so that a NaN fails; flow's t = 0 is clean data: no model call there
            ok = (
                len(t) == steps
                and t[0] == start
                and (t[1:] < t[:-1]).all()
                and (t[-1] > 0 if flow else t[-1] >= 0)
            )
            if not ok:
                raise SystemExit(
                    f"error: an explicit spacing must be {steps} strictly decreasing times from {start:g} "
                    f"down to {'above 0' if flow else '0'}, got {t.tolist()}"
                )
        elif spacing not in SPACINGS:
            raise SystemExit(f"error: unknown spacing {spacing!r}: use {', '.join(SPACINGS)}")
        elif spacing in ('logsnr', 'karras'):
            # flow: t=1 has infinite sigma/alpha
            t_max = 1 - 1e-4 if self.objective == 'flow' else T - 1.0
            t_min = 0.002 / 1.002 if self.objective == 'flow' else 0.0
            s_max, s_min = self.edm_sigma(torch.tensor([t_max, t_min], dtype=torch.float64))
            # EDM's sigma_max: above it no signal of [-1, 1] data is visible,
            s_max = s_max.clamp(max=80.0)
            # so grid points there are wasted; the first call stays at the true start, pure noise
            i = torch.linspace(0, 1, steps, dtype=torch.float64)
            if spacing == 'logsnr':
                s = (s_max.log() + i * (s_min.log() - s_max.log())).exp()
            else:
                rho = 7.0
                s = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            t = self.t_from_edm_sigma(s)
            # start from pure noise
            t[0] = 1.0 if self.objective == 'flow' else t_max
        elif self.objective == 'flow' or spacing == 'flowtime':
            u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
            # u = 1: pure noise, t = T-1
            t = u if self.objective == 'flow' else self.t_from_edm_sigma(u / (1 - u))
        # diffusers' DPMSolverMultistepScheduler default
        elif spacing == 'linspace':
            t = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
        # diffusers' DDIM/DDPM default
        elif spacing == 'leading':
            t = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0)
        # 'trailing': "Common Diffusion Noise Schedules and Sample Steps Are Flawed", table 2
        else:
            t = torch.from_numpy(np.round(np.arange(T, 0, -T / steps)) - 1).double()
        alpha, sigma = self.alpha_sigma(t)
        alpha = torch.cat([alpha, torch.ones(1, dtype=torch.float64)])
        sigma = torch.cat([sigma, torch.zeros(1, dtype=torch.float64)])
        return t, alpha, sigma


def vp_alphas_cumprod(schedule, T):
    """Cumulative signal fraction alpha_bar_t for discrete steps 0..T-1 (float64)."""
    # DDPM: betas from 1e-4 to 0.02
    if schedule == 'linear':
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    # iDDPM: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2), betas capped at 0.999
    elif schedule == 'cosine':
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor(
            [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}: use 'linear' or 'cosine'")
    return torch.cumprod(1 - betas, dim=0)


# -----------------------------------------------------------------------------
# Samplers


def threshold_x0(x0, ratio, max_value=1.0):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = the `ratio`
    quantile of |x0| (at least 1, at most max_value); clip x0 to [-s, s] and divide by s. For
    pixel-space models with strong guidance; off (ratio 0) by default."""
    s = x0.flatten(1).abs().float().quantile(ratio, dim=1).clamp(1, max_value).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return x0.clamp(-s, s) / s


def unipc_update(x, m, lam, A, S, s, p, variant, m_new=None):
    """One UniPC step of order p from grid point s to s+1, in data-prediction form (Zhao et al.
    2023, "UniPC": UniP-p, or with m_new, the data prediction at s+1, UniC-p). m: data predictions
    at s, s-1, ..., newest last. x_next = sigma_n/sigma_s x - alpha_n (e^-h - 1) m_s - alpha_n B(h)
    sum_k rho_k D_k, D_k = (m_k - m_s) / r_k, with h = lambda_n - lambda_s and r_k = (lambda_k -
    lambda_s) / h; the same arithmetic as diffusers' UniPCMultistepScheduler
    (multistep_uni_p_bh_update / multistep_uni_c_bh_update)."""
    h = lam[s + 1] - lam[s]
    # e^-h - 1
    phi1 = math.expm1(-h)
    # a constant data prediction: exact (DDIM)
    x = (S[s + 1] / S[s]) * x - A[s + 1] * phi1 * m[-1]
    # the other points: p-1 earlier predictions (r < 0) and, correcting, the new one (r = 1)
    r = [(lam[s - k] - lam[s]) / h for k in range(1, p)] + ([1.0] if m_new is not None else [])
    D = [(mk - m[-1]) / rk for mk, rk in zip(m[-2::-1][: p - 1] + [m_new], r)]
    if not r:
        return x
    # B(h) = h (bh1) or e^h - 1 (bh2), both in -h here; from pure noise (flow's t=1: lambda = -inf,
    # h = inf)
    # bh1's is infinite, so that step uses bh2's (= -1)
    B = -h if variant == 'bh1' and math.isfinite(h) else phi1
    # UniP-2 and UniC-1: rho = 1/2, the paper's (and diffusers') choice
    if len(r) == 1:
        rho = [0.5]
    # rho solves sum_k rho_k r_k^(n-1) = b_n = n! (-h) phi_{n+1}(-h) / B(h), n = 1..len(r)
    else:
        # g = (-h) phi_2(-h)
        b, g = [], phi1 / -h - 1
        for n in range(1, len(r) + 1):
            b.append(g * math.factorial(n) / B)
            # phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
            g = g / -h - 1 / math.factorial(n + 1)
        # a point at lambda = -inf (the pure-noise start) has r = -inf and D = 0: dropping it and
        # the last
        # equation is the limit of the system as r -> -inf (what IEEE arithmetic gives diffusers at
        # order 2)
        keep = [k for k, rk in enumerate(r) if math.isfinite(rk)]
        rho = [0.0] * len(r)
        sol = np.linalg.solve(np.vander([r[k] for k in keep], increasing=True).T, b[: len(keep)])
        for k, v in zip(keep, sol):
            rho[k] = float(v)
    return x - A[s + 1] * B * sum(c * d for c, d in zip(rho, D))


def unipc(x0_at, x, lam, A, S, steps, order=2, variant='bh2'):
    """UniPC multistep (Zhao et al. 2023), data-prediction form, as diffusers'
    UniPCMultistepScheduler runs it: after each model call (but the last) the corrector UniC redoes
    the step that led there with the new prediction, at no extra call; then the predictor UniP steps
    on. Warm-up from order 1; order min(order, steps left) at the end (lower_order_final). x0_at(x,
    i): the data prediction at grid point i; lam, A, S: log(alpha/sigma), alpha, sigma at the
    steps+1 grid points, the last clean."""
    # data predictions of the last steps, newest last
    m = []
    # the sample the last predictor step started from: the corrector redoes that step
    x_prev = x
    # and its order
    p = 1
    for i in range(steps):
        m_i = x0_at(x, i)
        # UniC: the prediction at x_i raises the order of the step x_{i-1} -> x_i by one
        if i > 0:
            x = unipc_update(x_prev, m, lam, A, S, i - 1, p, variant, m_new=m_i)
        m = (m + [m_i])[-3:]
        p = min(order, i + 1, steps - i)
        x_prev = x
        x = unipc_update(x, m, lam, A, S, i, p, variant)
    return x


def sample_loop(
    model_fn,
    x,
    diffusion,
    steps,
    sampler=None,
    order=None,
    spacing=None,
    eta=0.0,
    threshold=0.0,
    threshold_max=1.0,
    generator=None,
    variant='bh2',
    matrix=None,
):
    """Integrate from noise x to data in `steps` steps. model_fn(x, t) returns the network output at
    objective time t (CFG already applied: one batched call). Returns (x, nfe).
    spacing: a name (see Diffusion.sampling_schedule) or the `steps` model times themselves.
      dpm++: DPM-Solver++ multistep, order 1-3 (Lu et al. 2022), data-prediction form
      unipc: UniPC multistep, order 1-3 (Zhao et al. 2023), data-prediction form; variant 'bh1' or
      'bh2' ddim:  DDIM (Song et al. 2021); eta=0 deterministic, eta=1 is DDPM's ancestral sampler
      ddpm:  = ddim with eta=1
      euler, heun: the flow ODE dx/dt = v in t (flow objective only; heun uses 2 NFE per step but
      the last)
    matrix: instead of a sampler, a fitted solver (tune_solver): x_{i+1} = C[i, 0] x_0 + sum_j C[i,
    1+j] m_j."""
    # for what the caller leaves unsaid (None)
    default = default_solver(diffusion.objective, steps)
    sampler, order = sampler or default['sampler'], order or default['order']
    ts, alphas, sigmas = diffusion.sampling_schedule(
        steps, default['spacing'] if spacing is None else spacing
    )
    A, S = alphas.tolist(), sigmas.tolist()
    nfe = 0

    def x0_at(x, i):
        nonlocal nfe
        nfe += 1
        x0 = diffusion.to_x0(model_fn(x, ts[i].item()), x, A[i], S[i])
        return threshold_x0(x0, threshold, threshold_max) if threshold else x0

    # log-SNR/2: -inf at pure noise, +inf when clean
    lam = (alphas.log() - sigmas.log()).tolist()
    if matrix is not None:
        if len(matrix) != steps:
            raise SystemExit(
                f"error: a solver matrix of {len(matrix)} rows cannot take {steps} steps"
            )
        x_start, m = x, []
        for row in matrix:
            m.append(x0_at(x, len(m)))
            x = row[0] * x_start + sum(c * mj for c, mj in zip(row[1:], m))
    elif sampler == 'dpm++':
        # data predictions of the last steps, newest last
        hist = []
        for i in range(steps):
            hist = (hist + [x0_at(x, i)])[-3:]
            # warm up from first order; the step to sigma=0 is first order and, in short runs, the
            # one
            # before it at most second (as in diffusers: fewer, larger steps make extrapolation
            # unstable)
            k = min(
                order, len(hist), 1 if i == steps - 1 else 2 if i == steps - 2 and steps < 15 else 3
            )
            h = lam[i + 1] - lam[i]
            # exp(-h) - 1
            phi = np.expm1(-h)
            D0 = hist[-1]
            # exact for a constant D: DDIM
            x = (S[i + 1] / S[i]) * x - A[i + 1] * phi * D0
            # + the linear term of D in lambda (2M: eq. 9 of DPM-Solver++)
            if k >= 2:
                r0 = (lam[i] - lam[i - 1]) / h
                D1 = (D0 - hist[-2]) / r0
                if k == 2:
                    x = x - 0.5 * A[i + 1] * phi * D1
                # 3M: a quadratic in lambda through the last three predictions
                else:
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    D1_1 = (hist[-2] - hist[-3]) / r1
                    D2 = (D1 - D1_1) / (r0 + r1)
                    D1 = D1 + r0 / (r0 + r1) * (D1 - D1_1)
                    x = x + A[i + 1] * (phi / h + 1) * D1 - A[i + 1] * ((phi + h) / h**2 - 0.5) * D2
    elif sampler == 'unipc':
        if variant not in ('bh1', 'bh2'):
            raise SystemExit(f"error: unknown UniPC variant {variant!r}: use bh1 or bh2")
        x = unipc(x0_at, x, lam, A, S, steps, order, variant)
    elif sampler in ('ddim', 'ddpm'):
        eta = 1.0 if sampler == 'ddpm' else eta
        for i in range(steps):
            a, s, a_n, s_n = A[i], S[i], A[i + 1], S[i + 1]
            x0 = x0_at(x, i)
            eps = (x - a * x0) / s
            # variance of the posterior q(x_next | x, x0), scaled by eta^2 (DDIM eq. 16 in
            # alpha/sigma form)
            var = eta**2 * (s_n / s) ** 2 * (s**2 - (a / a_n) ** 2 * s_n**2) if s_n > 0 else 0.0
            x = a_n * x0 + max(s_n**2 - var, 0.0) ** 0.5 * eps
            if var > 0:
                x = x + var**0.5 * torch.randn(
                    x.shape, generator=generator, device=x.device, dtype=x.dtype
                )
    elif sampler in ('euler', 'heun'):
        if diffusion.objective != 'flow':
            raise SystemExit(
                f"error: sampler {sampler!r} integrates the flow ODE in t: use it with objective='flow'"
            )
        for i in range(steps):
            # flow: sigma = t
            t, t_n = S[i], S[i + 1]
            v = (x - x0_at(x, i)) / t
            x_next = x + (t_n - t) * v
            # trapezoid: average with the slope at the Euler end point
            if sampler == 'heun' and t_n > 0:
                v_n = (x_next - x0_at(x_next, i + 1)) / t_n
                x_next = x + (t_n - t) * 0.5 * (v + v_n)
            x = x_next
    else:
        raise SystemExit(
            f"error: unknown sampler {sampler!r}: use dpm++, unipc, ddim, ddpm, euler or heun"
        )
    return x, nfe


def solver_matrix(diffusion, steps, sampler='unipc', order=3, spacing='flowtime', variant='bh2'):
    """sample_loop's deterministic solver as a matrix C [steps, steps+1]: x_{i+1}, the point of its
    next model call (the last row: the end point), is C[i, 0] x_0 + sum_{j <= i} C[i, 1+j] m_j, a
    fixed combination of the start noise and the data predictions so far; every sampler here (one
    call a step) is linear in them. Read off by running sample_loop itself on basis vectors: a
    'model' whose j-th data prediction is the (1+j)-th unit vector."""
    # noise drawn at each step; two calls a step
    if sampler in ('ddpm', 'heun'):
        raise SystemExit(
            f"error: a solver matrix needs a deterministic sampler with one call a step, not {sampler!r}"
        )
    A, S = (v.tolist() for v in diffusion.sampling_schedule(steps, spacing)[1:])
    basis, points = torch.eye(steps + 1, dtype=torch.float64), []

    def unit(x, t):
        j = len(points)
        points.append(x)
        return diffusion.from_x0(basis[1 + j : 2 + j], x, A[j], S[j])

    end, _ = sample_loop(
        unit, basis[:1], diffusion, steps, sampler, order, spacing, variant=variant
    )
    return torch.cat(points[1:] + [end])


def tune_solver(
    model_fn,
    x,
    diffusion,
    steps,
    sampler='unipc',
    order=3,
    spacing='flowtime',
    ref=None,
    iters=400,
    lr=1e-3,
    ref_steps=100,
):
    """A solver fitted to this model: the matrix of solver_matrix (each point a combination of the
    start noise and the data predictions so far; sample_loop(matrix=...)) fitted by gradient descent
    through the model so that the end points from the noise x land on ref, the same ODE solved
    finely (default: UniPC-3, 2*ref_steps log-SNR steps). After "Bespoke Non-Stationary Solvers"
    (Shaul et al. 2024); the times stay the grid's ("Align Your Steps"-style time search alone was
    tried first: 0.46-0.92x diffusers' error at 5 NFE, README). It starts from the solver it is
    given, exactly, and keeps its best matrix on x, so it is never worse there. Adam, lr with cosine
    decay, iters steps: ~3 * iters * steps model calls on x. Returns (matrix, info)."""
    rms = lambda a, b: (a.double() - b.double()).pow(2).mean().sqrt()
    with torch.no_grad():
        ref_change = 0.0
        if ref is None:
            ref = sample_loop(model_fn, x, diffusion, 2 * ref_steps, 'unipc', 3, 'logsnr')[0]
            ref_change = rms(
                sample_loop(model_fn, x, diffusion, ref_steps, 'unipc', 3, 'logsnr')[0], ref
            ).item()
    start = solver_matrix(diffusion, steps, sampler, order, spacing)
    # row i: x_0 and m_0..m_i
    mask = torch.ones_like(start).tril(1)
    C = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([C], lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    errors, best = [], start
    for i in range(iters + 1):
        with torch.enable_grad():
            loss = rms(
                sample_loop(model_fn, x, diffusion, steps, spacing=spacing, matrix=C * mask)[0], ref
            )
        errors.append(loss.item())
        if errors[-1] <= min(errors):
            best = (C * mask).detach().clone()
        if i == iters or not math.isfinite(errors[-1]):
            break
        (C.grad,) = torch.autograd.grad(loss, C)
        # a sample switching modes makes a cliff in the loss
        torch.nn.utils.clip_grad_norm_([C], 1.0)
        opt.step()
        decay.step()
    if ref_change > 0.1 * min(errors):
        print(
            f"warning: tune_solver's reference moved {ref_change:.2e} from {ref_steps} to {2 * ref_steps} steps, "
            f"not << the tuned error {min(errors):.2e}: raise ref_steps"
        )
    return best, dict(start_error=errors[0], error=min(errors), ref_change=ref_change, iters=iters)


def guided(
    model,
    diffusion,
    y,
    null_class,
    cfg_scale,
    text=None,
    null_text=None,
    hint=None,
    control_scale=1.0,
    scale_input=False,
):
    """The network with classifier-free guidance: out = uncond + s * (cond - uncond), with the
    conditional and unconditional halves in one batched forward (one network evaluation per step). A
    text model: text = the prompts' (states, mask, pooled), one per image; null_text = the empty
    caption's, which is the unconditional half (y is then the null class throughout). A control
    branch: hint [B, C, H, W], one per image, at strength control_scale (a number or [B]); both
    halves see the hint (ControlNet's default: CFG guides the label or caption, the hint holds in
    both). cfg_scale: a number or [B]. scale_input: a guidance-distilled model
    (model.config.guidance), which takes the scale as an input: one call, no unconditional half. ->
    model_fn(x, t), t a number or [B] (objective times)."""
    per_image = torch.is_tensor(cfg_scale)
    use_cfg = (
        (per_image or cfg_scale != 1) and (null_class > 0 or text is not None) and not scale_input
    )
    both = lambda a: torch.cat([a, a]) if use_cfg and torch.is_tensor(a) else a
    control = {} if hint is None else dict(hint=both(hint), control_scale=both(control_scale))
    if scale_input:
        control['guidance'] = (
            cfg_scale if per_image else torch.full((len(y),), float(cfg_scale), device=y.device)
        )
    if use_cfg:
        y = torch.cat([y, torch.full_like(y, null_class)])
        if text is not None:
            text = tuple(torch.cat([a, e.expand_as(a)]) for a, e in zip(text, null_text))
        if per_image:
            cfg_scale = cfg_scale.float().view(-1, *[1] * 3)

    def model_fn(x, t):
        xx = both(x)
        tt = (
            diffusion.model_time(torch.as_tensor(t, dtype=torch.float64, device=x.device))
            .float()
            .expand(len(x))
        )
        out = model(xx, both(tt), y, text, **control).float()
        if not use_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return model_fn
