"""
The samplers: how samples are integrated from noise to data on the alpha/sigma of
diffusion.Diffusion. One function per sampler, the schedule passed in (k-diffusion style):
sample_dpmpp(x0_at, x, lam, A, S, order), where x0_at(x, i) is the model's data prediction at grid
point i, and lam, A, S are log(alpha/sigma), alpha and sigma at the steps+1 grid points, the last
one clean. sample_loop is the one entry point: it builds the schedule and x0_at from a model_fn(x,
t) and calls the sampler by name (SAMPLE_FNS). guided makes a network a model_fn, with
classifier-free guidance. Imports diffusion.py's alpha/sigma only through the Diffusion it is given.

References:
- DPM-Solver++: Lu et al. (2022); UniPC: Zhao et al. (2023); DDIM: Song et al. (2021); DDPM: Ho et
  al. (2020); CFG: Ho & Salimans (2022); dynamic thresholding: Saharia et al., "Imagen" (2022).
- Solvers fitted to a model (tune_solver): after "Bespoke Non-Stationary Solvers", Shaul et al.
  (2024).
"""

import math

import numpy as np
import torch


def default_solver(objective, steps):
    """The solver sample_loop uses when none is named, chosen by the Gaussian-mixture benchmark
    (bench_samplers.py, README): UniPC-3 for every objective, on the 'flowtime' grid below 30 steps
    (at 5-20 NFE it leads the log-SNR grid: its coarse steps go where each sample's mode is decided)
    and on 'logsnr' from 30 (the flowtime grid's last model call, at sigma/alpha = 1/(steps-1), then
    limits it: 8x the log-SNR grid's error at 50 NFE)."""
    return dict(sampler='unipc', order=3, spacing='flowtime' if steps < 30 else 'logsnr')


def solver_name(sampler, order, spacing):
    """'unipc3 flowtime': a solver as sample.py and the benchmarks print it, the order only where
    there is a choice; spacing None: the default's, by the step count ('flowtime|logsnr')."""
    return (
        f"{sampler}{order if sampler in ('dpm++', 'unipc') else ''} {spacing or 'flowtime|logsnr'}"
    )


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
    # h = inf) bh1's is infinite, so that step uses bh2's (= -1)
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
        # the last equation is the limit of the system as r -> -inf (what IEEE arithmetic gives
        # diffusers at order 2)
        keep = [k for k, rk in enumerate(r) if math.isfinite(rk)]
        rho = [0.0] * len(r)
        sol = np.linalg.solve(np.vander([r[k] for k in keep], increasing=True).T, b[: len(keep)])
        for k, v in zip(keep, sol):
            rho[k] = float(v)
    return x - A[s + 1] * B * sum(c * d for c, d in zip(rho, D))


# -----------------------------------------------------------------------------
# The samplers: each takes x0_at(x, i), the start noise x and the schedule lam, A, S (steps+1
# points, the last clean) and returns the end point


def sample_dpmpp(x0_at, x, lam, A, S, order=2):
    """DPM-Solver++ multistep, order 1-3 (Lu et al. 2022), data-prediction form. Warm-up from first
    order; the step to sigma=0 is first order and, in short runs, the one before it at most second
    (as in diffusers: fewer, larger steps make extrapolation unstable)."""
    steps = len(A) - 1
    # data predictions of the last steps, newest last
    hist = []
    for i in range(steps):
        hist = (hist + [x0_at(x, i)])[-3:]
        # the highest order this step may take: 1 for the last, 2 for the one before in short runs
        cap = 1 if i == steps - 1 else 2 if i == steps - 2 and steps < 15 else 3
        k = min(order, len(hist), cap)
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
    return x


def sample_unipc(x0_at, x, lam, A, S, order=2, variant='bh2'):
    """UniPC multistep (Zhao et al. 2023), data-prediction form, as diffusers'
    UniPCMultistepScheduler runs it: after each model call (but the last) the corrector UniC redoes
    the step that led there with the new prediction, at no extra call; then the predictor UniP steps
    on. Warm-up from order 1; order min(order, steps left) at the end (lower_order_final). x0_at(x,
    i): the data prediction at grid point i; lam, A, S: log(alpha/sigma), alpha, sigma at the
    steps+1 grid points, the last clean. variant: 'bh1' or 'bh2', the B(h) of the update."""
    if variant not in ('bh1', 'bh2'):
        raise SystemExit(f"error: unknown UniPC variant {variant!r}: use bh1 or bh2")
    steps = len(A) - 1
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


def sample_ddim(x0_at, x, lam, A, S, eta=0.0, generator=None):
    """DDIM (Song et al. 2021): eta=0 deterministic, eta=1 DDPM's ancestral sampler (its noise drawn
    from generator)."""
    for i in range(len(A) - 1):
        a, s, a_n, s_n = A[i], S[i], A[i + 1], S[i + 1]
        x0 = x0_at(x, i)
        eps = (x - a * x0) / s
        # the posterior q(x_next | x, x0)'s variance, times eta^2 (DDIM eq. 16, alpha/sigma form)
        var = eta**2 * (s_n / s) ** 2 * (s**2 - (a / a_n) ** 2 * s_n**2) if s_n > 0 else 0.0
        x = a_n * x0 + max(s_n**2 - var, 0.0) ** 0.5 * eps
        if var > 0:
            x = x + var**0.5 * torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype
            )
    return x


def sample_ddpm(x0_at, x, lam, A, S, generator=None):
    """DDPM's ancestral sampler (Ho et al. 2020): DDIM with eta=1."""
    return sample_ddim(x0_at, x, lam, A, S, 1.0, generator)


def sample_euler(x0_at, x, lam, A, S):
    """Euler on the flow ODE dx/dt = v in t (flow objective only: there sigma = t)."""
    for i in range(len(S) - 1):
        t, t_n = S[i], S[i + 1]
        v = (x - x0_at(x, i)) / t
        x = x + (t_n - t) * v
    return x


def sample_heun(x0_at, x, lam, A, S):
    """Heun on the flow ODE dx/dt = v in t (flow objective only): 2 calls a step, 1 for the last
    (to t=0, where there is no slope to take)."""
    for i in range(len(S) - 1):
        t, t_n = S[i], S[i + 1]
        v = (x - x0_at(x, i)) / t
        x_next = x + (t_n - t) * v
        # trapezoid: average with the slope at the Euler end point
        if t_n > 0:
            v_n = (x_next - x0_at(x_next, i + 1)) / t_n
            x_next = x + (t_n - t) * 0.5 * (v + v_n)
        x = x_next
    return x


def sample_matrix(x0_at, x, matrix):
    """A fitted solver (tune_solver, solver_matrix) instead of a sampler: the point of model call
    i+1 (the last: the end point) is x_{i+1} = C[i, 0] x_0 + sum_j C[i, 1+j] m_j, m_j the data
    prediction at point j."""
    x_start, m = x, []
    for row in matrix:
        m.append(x0_at(x, len(m)))
        x = row[0] * x_start + sum(c * mj for c, mj in zip(row[1:], m))
    return x


# name -> (the sampler, the settings of sample_loop it takes beside the schedule)
SAMPLE_FNS = {
    'dpm++': (sample_dpmpp, ('order',)),
    'unipc': (sample_unipc, ('order', 'variant')),
    'ddim': (sample_ddim, ('eta', 'generator')),
    'ddpm': (sample_ddpm, ('generator',)),
    'euler': (sample_euler, ()),
    'heun': (sample_heun, ()),
}
SAMPLERS = tuple(SAMPLE_FNS)


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
    sampler: a name of SAMPLE_FNS (None: default_solver's):
      dpm++: DPM-Solver++ multistep, order 1-3 (sample_dpmpp)
      unipc: UniPC multistep, order 1-3, variant 'bh1' or 'bh2' (sample_unipc)
      ddim:  DDIM; eta=0 deterministic, eta=1 is DDPM's ancestral sampler (sample_ddim)
      ddpm:  = ddim with eta=1 (sample_ddpm)
      euler, heun: the flow ODE dx/dt = v in t (flow objective only; heun uses 2 NFE per step but
      the last)
    spacing: a name (see Diffusion.sampling_schedule) or the `steps` model times themselves.
    threshold: dynamic thresholding of each data prediction (threshold_x0), 0 = off.
    matrix: instead of a sampler, a fitted solver (tune_solver): x_{i+1} = C[i, 0] x_0 + sum_j C[i,
    1+j] m_j (sample_matrix)."""
    # for what the caller leaves unsaid (None)
    default = default_solver(diffusion.objective, steps)
    sampler = sampler or default['sampler']
    order = order or default['order']
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
        x = sample_matrix(x0_at, x, matrix)
        return x, nfe
    if sampler not in SAMPLE_FNS:
        raise SystemExit(
            f"error: unknown sampler {sampler!r}: use dpm++, unipc, ddim, ddpm, euler or heun"
        )
    if sampler in ('euler', 'heun') and diffusion.objective != 'flow':
        raise SystemExit(
            f"error: sampler {sampler!r} integrates the flow ODE in t: use it with objective='flow'"
        )
    fn, takes = SAMPLE_FNS[sampler]
    settings = dict(order=order, variant=variant, eta=eta, generator=generator)
    x = fn(x0_at, x, lam, A, S, **{k: settings[k] for k in takes})
    return x, nfe


# -----------------------------------------------------------------------------
# Solvers fitted to a model, and classifier-free guidance


def solver_matrix(diffusion, steps, sampler='unipc', order=3, spacing='flowtime', variant='bh2'):
    """sample_loop's deterministic solver as a matrix C [steps, steps+1]: x_{i+1}, the point of its
    next model call (the last row: the end point), is C[i, 0] x_0 + sum_{j <= i} C[i, 1+j] m_j, a
    fixed combination of the start noise and the data predictions so far; every sampler here (one
    call a step) is linear in them. Read off by running sample_loop itself on basis vectors: a
    'model' whose j-th data prediction is the (1+j)-th unit vector."""
    # noise drawn at each step; two calls a step
    if sampler in ('ddpm', 'heun'):
        raise SystemExit(
            "error: a solver matrix needs a deterministic sampler with one call a step, not "
            f"{sampler!r}"
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


def fit_verdict(err, err_start, far=0.0, resamples=1000, level=0.95):
    """Whether a fitted solver is kept, from the per-sample squared errors on noise used neither to
    fit nor to select it: err the fit's, err_start the untuned solver's, from the same noise. Kept
    only where (1) the ratio of their RMS errors is below 1 at the `level` upper bound of a paired
    bootstrap over the samples, and (2) its win would survive one more sample as bad as the worst
    seen or as `far` (the squared error of a sample sent elsewhere in the data): a fit that sends 1
    sample in len(err) to another mode can show none here, and where the error is small (20 NFE)
    such a sample sets the RMS of a later batch. -> (kept, why, stats)."""
    n = len(err)
    ratio = (err.sum() / err_start.sum()).sqrt().item()
    # fixed resamples: the same fit gets the same verdict
    idx = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(0))
    hi = (err[idx].sum(1) / err_start[idx].sum(1)).sqrt().quantile(level).item()
    worst = max(err.max().item(), err_start.max().item(), far)
    one_more = ((err.sum() + worst) / err_start.sum()).sqrt().item()
    stats = dict(check_ratio=ratio, check_ratio_hi=hi, check_one_more=one_more)
    if hi >= 1:
        why = f"error ratio {ratio:.2f}, its {level:.0%} bound {hi:.2f} not below 1"
    elif one_more >= 1:
        why = f"error ratio {ratio:.2f}, {one_more:.2f} with one more sample far off"
    else:
        return True, f"error ratio {ratio:.2f}, its {level:.0%} bound {hi:.2f}", stats
    return False, why, stats


def tune_solver(
    model_fn,
    x,
    x_val,
    diffusion,
    steps,
    sampler='unipc',
    order=3,
    spacing='flowtime',
    ref=None,
    ref_val=None,
    iters=400,
    lr=1e-3,
    ref_steps=100,
    *,
    x_check,
    ref_check=None,
):
    """A solver fitted to this model: the matrix of solver_matrix (each point a combination of the
    start noise and the data predictions so far; sample_loop(matrix=...)) fitted by gradient descent
    through the model so that the end points from the noise x land on ref, the same ODE solved
    finely (default: UniPC-3, 2*ref_steps log-SNR steps). After "Bespoke Non-Stationary Solvers"
    (Shaul et al. 2024); the times stay the grid's. It starts from the solver it is given, exactly.
    The iterate best on x_val (ref_val: its converged solve) is selected, then checked against the
    start on x_check (ref_check; a multiple of x's size: a larger batch sees rarer failures) and
    kept only where fit_verdict says it wins there ('used'; the best of many iterates on x_val is
    biased low there); else the start is returned. Adam, lr with cosine decay, iters steps: ~4 *
    iters * steps model calls on x's size. Returns (matrix, info: each batch's RMS errors, start
    and fit, and the verdict and why)."""
    rms = lambda a, b: (a.double() - b.double()).pow(2).mean().sqrt()
    mse = lambda a, b: (a.double() - b.double()).pow(2).flatten(1).mean(1)
    if len(x_check) % len(x) or len(x_val) != len(x):
        raise SystemExit(
            f"error: tune_solver takes x_val of x's {len(x)} samples and x_check of a multiple of "
            f"them, not {len(x_val)} and {len(x_check)}"
        )

    # model_fn is bound to x's batch (its labels, prompts): x_check goes in batches of that size
    def solve(z, *args, **kw):
        return torch.cat(
            [sample_loop(model_fn, c, diffusion, *args, **kw)[0] for c in z.split(len(x))]
        )

    converged = lambda z: solve(z, 2 * ref_steps, 'unipc', 3, 'logsnr')
    with torch.no_grad():
        ref_change = 0.0
        if ref is None:
            ref = converged(x)
            half = sample_loop(model_fn, x, diffusion, ref_steps, 'unipc', 3, 'logsnr')[0]
            ref_change = rms(half, ref).item()
        ref_val = converged(x_val) if ref_val is None else ref_val
        ref_check = converged(x_check) if ref_check is None else ref_check
    start = solver_matrix(diffusion, steps, sampler, order, spacing)
    # row i: x_0 and m_0..m_i
    mask = torch.ones_like(start).tril(1)
    C = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([C], lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    errors, val_errors, best, kept = [], [], start, 0
    for i in range(iters + 1):
        with torch.enable_grad():
            out = sample_loop(model_fn, x, diffusion, steps, spacing=spacing, matrix=C * mask)[0]
            loss = rms(out, ref)
        errors.append(loss.item())
        with torch.no_grad():
            out = sample_loop(model_fn, x_val, diffusion, steps, spacing=spacing, matrix=C * mask)
            val_errors.append(rms(out[0], ref_val).item())
        # the best on the selection noise so far (a NaN never is)
        if i and val_errors[-1] < val_errors[kept]:
            best, kept = (C * mask).detach().clone(), i
        if i == iters or not math.isfinite(errors[-1]):
            break
        (C.grad,) = torch.autograd.grad(loss, C)
        # a sample switching modes makes a cliff in the loss
        torch.nn.utils.clip_grad_norm_([C], 1.0)
        opt.step()
        decay.step()
    if ref_change > 0.1 * errors[kept]:
        print(
            f"warning: tune_solver's reference moved {ref_change:.2e} from {ref_steps} to "
            f"{2 * ref_steps} steps, not << the tuned error {errors[kept]:.2e}: raise ref_steps"
        )
    with torch.no_grad():
        check = lambda m: mse(solve(x_check, steps, spacing=spacing, matrix=m), ref_check)
        err_start = check(start)
        err = check(best) if kept else err_start
        # a sample in another mode is off by about the distance between two end points
        far = 2 * ref_check.double().flatten(1).var(0).mean().item()
    used, why, stats = fit_verdict(err, err_start, far)
    if not kept:
        used, why = False, 'no iterate beat the untuned solver on the selection noise'
    info = dict(start_error=errors[0], error=errors[kept], val_start_error=val_errors[0])
    info.update(val_error=val_errors[kept], check_start_error=err_start.mean().sqrt().item())
    info.update(check_error=err.mean().sqrt().item(), used=used, why=why, **stats)
    info.update(ref_change=ref_change, iters=iters, kept_iter=kept, check_samples=len(x_check))
    return (best if used else start), dict(info, val_errors=val_errors)


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
        # a learned-variance model (DiT's learn_sigma) outputs 2C channels: every sampler uses the
        # prediction's C only; DDPM and DDIM take the fixed posterior variance, not the learned one
        out = model(xx, both(tt), y, text, **control).float()[:, : x.shape[1]]
        if not use_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return model_fn
