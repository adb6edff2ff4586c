"""
The diffusion math: how x_t is made from data, what the network is trained to predict, how x0 is
read back from its output, and the times a sampler steps through (Diffusion.sampling_schedule).
samplers.py integrates samples on it; train.py, sample.py and bench.py import it; it imports no
network (a denoiser is any model_fn(x, t)).

References:
- DDPM: Ho et al. (2020); cosine schedule: Nichol & Dhariwal, "Improved DDPM" (2021).
- v-prediction: Salimans & Ho, "Progressive Distillation" (2022).
- Rectified flow / flow matching: Liu et al. (2022), Lipman et al. (2022); logit-normal t: SD3,
  Esser et al. (2024).
- Min-SNR-gamma weighting: Hang et al. (2023); EDM's sigma and rho=7 spacing: Karras et al. (2022).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

# the grids sampling_schedule makes by name (sample.py's --spacing)
SPACINGS = ('flowtime', 'logsnr', 'karras', 'linspace', 'leading', 'trailing')


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
        self.objective = objective
        self.schedule = schedule
        self.prediction = prediction
        self.T = num_timesteps
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

    def loss(self, model, x0, y, t, noise, min_snr_gamma=0.0, text=None, hint=None, aug=None):
        """Mean squared error of the network's prediction; t and noise are drawn by the caller.
        min_snr_gamma > 0: Min-SNR-gamma weighting (Hang et al. 2023), see min_snr_weight.
        text: the captions' (states, mask, pooled) for a text-conditional model, else None.
        hint: the control branch's hint maps, else None (a model without a branch is not even passed
        the argument). aug: the augmentation labels (augment.py) for a model told them, or None."""
        alpha, sigma = (s.float().view(-1, 1, 1, 1) for s in self.alpha_sigma(t))
        x_t = alpha * x0 + sigma * noise
        extra = {k: v for k, v in (('hint', hint), ('aug', aug)) if v is not None}
        out = model(x_t, self.model_time(t).float(), y, text, **extra)
        # a learned-variance model's (DiT's learn_sigma) second half, its variance, is not trained
        # here: the VLB term that trained it is not this loss
        out = out[:, : x0.shape[1]]
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
                    f"error: an explicit spacing must be {steps} strictly decreasing times from "
                    f"{start:g} down to {'above 0' if flow else '0'}, got {t.tolist()}"
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


class Denoise:
    """The plain training objective: Diffusion.loss of a batch at its draws (t, noise),
    Min-SNR-gamma weighted in training and plain in evaluation, in one round: the whole run.
    distill.Distill is the other objective; train.py's loop calls these methods of either and
    nothing else. A regulariser (e.g. REPA) is an objective that wraps this one."""

    def __init__(self, diffusion, min_snr_gamma=0.0, max_iters=0):
        self.diffusion = diffusion
        self.min_snr_gamma = min_snr_gamma
        # the steps at which rounds end (each is evaluated): one round, the whole run
        self.ends = [max_iters]

    def span(self, step):
        """The first step of step's round and the step it ends at: the LR schedule's span."""
        return 0, self.ends[0]

    def begin(self, step, model, ema):
        """Before each step: whether it starts a new round (a plain run has one)."""
        return False

    def config(self, step):
        """Settings sample.py needs beyond train.py's own (a student's grid): none."""
        return {}

    def loss(self, model, batch, draws, min_snr_gamma=None):
        gamma = self.min_snr_gamma if min_snr_gamma is None else min_snr_gamma
        x0, y, t, noise = batch.x0, batch.y, draws.t, draws.noise
        return self.diffusion.loss(model, x0, y, t, noise, gamma, batch.text, batch.hint, batch.aug)

    def eval_loss(self, model, batch, draws):
        """The plain MSE, whatever the training weighting."""
        return self.loss(model, batch, draws, min_snr_gamma=0.0)

    def calls(self):
        """Forward passes per example a step costs, for MFU: the forward, and its backward (2x)."""
        return 3

    def round_file(self, step):
        """The file a round's end keeps its model in besides ckpt.pt, and what it is: none."""
        return None

    def state_dict(self):
        """What a checkpoint keeps of the objective: nothing."""
        return {}

    def load_state_dict(self, ckpt):
        pass
