"""The diffusion maths by value: the training loss and its Min-SNR weight against closed forms,
classifier-free guidance, Heun's order, thresholding inside the sampling loop and the Karras grid.
Fake networks with known outputs stand in for the model, so each test pins one formula and a
one-line slip in it fails here. CPU, seeded, well under a second each."""

import math
import os

import numpy as np
import pytest
import torch

from diffusion import Diffusion
from samplers import guided, sample_loop
from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 1000


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def alphas_cumprod(schedule):
    """alpha_bar_t written out again here (DDPM linear betas; iDDPM cosine, betas capped at 0.999),
    float64."""
    if schedule == 'linear':
        betas = np.linspace(1e-4, 0.02, T)
    else:
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(T)
        betas = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    return np.cumprod(1 - betas)


def alpha_sigma(objective, schedule, t):
    """Closed-form signal/noise scales: flow alpha = 1 - t, sigma = t; vp alpha^2 = alpha_bar_t
    (integer t)."""
    t = np.asarray(t, dtype=np.float64)
    if objective == 'flow':
        return 1 - t, t
    ac = alphas_cumprod(schedule)[t.astype(int)]
    return np.sqrt(ac), np.sqrt(1 - ac)


# every objective/prediction pair train.py accepts (flow always predicts the velocity)
CASES = [('flow', 'cosine', 'v')] + [
    ('vp', s, p) for s in ('linear', 'cosine') for p in ('eps', 'v', 'x0')
]
# clean to noisy: SNR from ~1e4 to ~1e-5
TIMES = {'flow': [0.05, 0.3, 0.7, 0.95], 'vp': [0, 250, 600, 999]}


class Recorder:
    """A fake network: remembers what it was called with and returns a fixed tensor."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def __call__(self, x, t, y, text=None):
        self.calls.append((x, t, y, text))
        return self.out


def loss_inputs(objective):
    """x0, noise, the fixed network output (all [4, 3, 4, 4]), labels and t, seeded."""
    x0, noise, out = randn(4, 3, 4, 4, seed=1), randn(4, 3, 4, 4, seed=2), randn(4, 3, 4, 4, seed=3)
    return (
        x0,
        noise,
        out,
        torch.tensor([0, 1, 2, 3]),
        torch.tensor(TIMES[objective], dtype=torch.float64),
    )


def closed_form_target(objective, prediction, x0, noise, alpha, sigma):
    if objective == 'flow':
        # d x_t / dt of x_t = (1 - t) x0 + t noise
        return noise - x0
    # v: Salimans & Ho
    return {'eps': noise, 'v': alpha * noise - sigma * x0, 'x0': x0}[prediction]


def per_example(a):
    return a.reshape(len(a), -1).mean(1)


@pytest.mark.parametrize('objective, schedule, prediction', CASES)
def test_loss_closed_form(objective, schedule, prediction):
    # the network must see x_t = alpha x0 + sigma noise at its 0..1000 time, and be scored against
    # the right target
    d = Diffusion(objective, schedule, prediction, T)
    x0, noise, out, y, t = loss_inputs(objective)
    net = Recorder(out)
    loss = d.loss(net, x0, y, t, noise)
    a, s = (
        torch.from_numpy(v).view(-1, 1, 1, 1) for v in alpha_sigma(objective, schedule, t.numpy())
    )
    x0, noise = x0.double(), noise.double()
    ((x_t, t_seen, y_seen, _),) = net.calls
    torch.testing.assert_close(x_t.double(), a * x0 + s * noise, rtol=0, atol=1e-6)
    torch.testing.assert_close(t_seen.double(), t * 1000 if objective == 'flow' else t)
    assert torch.equal(y_seen, y)
    target = closed_form_target(objective, prediction, x0, noise, a, s)
    assert loss.item() == pytest.approx((out.double() - target).pow(2).mean().item(), rel=1e-6)


@pytest.mark.parametrize('objective, schedule, prediction', CASES)
@pytest.mark.parametrize('gamma', [1.0, 5.0])
def test_min_snr_weight_closed_form(objective, schedule, prediction, gamma):
    # Hang et al.: weight = min(SNR, gamma) / k^2, k^2 = what one unit of x0 error costs in this
    # output's units
    d = Diffusion(objective, schedule, prediction, T)
    t = np.array(TIMES[objective])
    a, s = alpha_sigma(objective, schedule, t)
    snr = (a / s) ** 2
    # flow's velocity counts as v
    k2 = {'eps': snr, 'v': 1 / s**2, 'x0': np.ones_like(snr)}[prediction]
    want = np.minimum(snr, gamma) / k2
    got = d.min_snr_weight(torch.from_numpy(t), gamma)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # both sides of the clamp are exercised
    assert (snr > gamma).any() and (snr < gamma).any()


@pytest.mark.parametrize('objective, schedule, prediction', CASES)
def test_min_snr_loss(objective, schedule, prediction):
    gamma = 5.0
    d = Diffusion(objective, schedule, prediction, T)
    x0, noise, out, y, t = loss_inputs(objective)
    loss = d.loss(Recorder(out), x0, y, t, noise, min_snr_gamma=gamma).item()
    a, s = alpha_sigma(objective, schedule, t.numpy())
    snr = torch.from_numpy((a / s) ** 2)
    a, s = (torch.from_numpy(v).view(-1, 1, 1, 1) for v in (a, s))
    x0, noise, out = x0.double(), noise.double(), out.double()
    # 1. the weighted per-example MSE, weights written out by hand
    k2 = {'eps': snr, 'v': 1 / s.flatten() ** 2, 'x0': torch.ones_like(snr)}[prediction]
    mse = per_example((out - closed_form_target(objective, prediction, x0, noise, a, s)) ** 2)
    assert loss == pytest.approx((snr.clamp(max=gamma) / k2 * mse).mean().item(), rel=1e-5)
    # 2. what the weighting is for: every output type is scored as min(SNR, gamma) * |x0 error|^2
    x_t = a * x0 + s * noise
    x0_hat = {'flow': x_t - s * out, 'eps': (x_t - s * out) / a, 'v': a * x_t - s * out, 'x0': out}[
        'flow' if objective == 'flow' else prediction
    ]
    assert loss == pytest.approx(
        (snr.clamp(max=gamma) * per_example((x0_hat - x0) ** 2)).mean().item(), rel=1e-5
    )


# -----------------------------------------------------------------------------
# classifier-free guidance


def test_cfg_class_labels():
    num_classes, scale, t = 3, 3.0, 0.25
    d = Diffusion('flow')
    calls = []

    # output depends on the label, so each half's label shows in the result
    def net(x, tt, y, text):
        calls.append((x, tt, y))
        return x + 10 * y.view(-1, 1, 1, 1).float()

    x, y = randn(3, 2, 4, 4), torch.tensor([0, 2, 1])
    out = guided(net, d, y, num_classes, scale)(x, t)
    # one batched forward for both halves
    ((xx, tt, yy),) = calls
    assert torch.equal(xx, torch.cat([x, x])) and torch.equal(tt, torch.full((6,), 250.0))
    assert torch.equal(yy[:3], y)
    # the null class: index num_classes, unlike every real label
    assert (yy[3:] == num_classes).all()
    cond, uncond = x + 10 * y.view(-1, 1, 1, 1), x + 10 * num_classes
    torch.testing.assert_close(out, uncond + scale * (cond - uncond))


def test_cfg_text_uses_the_empty_caption():
    scale = 4.0
    d = Diffusion('vp', 'linear', 'eps')
    calls = []

    # output depends on the caption states, mask and pooled vector
    def net(x, tt, y, text):
        calls.append((x, y, text))
        states, mask, pooled = text
        return (
            x
            + (states * mask[..., None]).sum((1, 2)).view(-1, 1, 1, 1)
            + pooled.sum(1).view(-1, 1, 1, 1)
        )

    x, y = randn(2, 2, 4, 4), torch.zeros(2, dtype=torch.long)
    text = (
        randn(2, 5, 8, seed=1),
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool(),
        randn(2, 8, seed=2),
    )
    null = (randn(1, 5, 8, seed=3), torch.tensor([[1, 1, 0, 0, 0]]).bool(), randn(1, 8, seed=4))
    # a text model: num_classes 0, null class 0
    out = guided(net, d, y, 0, scale, text, null)(x, 500.0)
    ((xx, yy, seen),) = calls
    assert torch.equal(xx, torch.cat([x, x])) and (yy == 0).all()
    # first half: the prompts; second half: the empty caption
    for a, e, s in zip(text, null, seen):
        assert torch.equal(s[:2], a) and torch.equal(s[2:], e.expand_as(a))
    embed = lambda st, m, p: (st * m[..., None]).sum((1, 2)) + p.sum(1)
    cond, uncond = x + embed(*text).view(-1, 1, 1, 1), x + embed(*null).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, uncond + scale * (cond - uncond))


@pytest.mark.parametrize('num_classes, scale', [(3, 1.0), (0, 4.0)])
def test_no_guidance_is_one_plain_call(num_classes, scale):
    # cfg_scale 1 (or an unconditional model): the network once, on the batch as given, output
    # untouched
    net = Recorder(randn(3, 2, 4, 4, seed=5))
    y = torch.tensor([0, 2, 1]) if num_classes else torch.zeros(3, dtype=torch.long)
    out = guided(net, Diffusion('flow'), y, num_classes, scale)(randn(3, 2, 4, 4), 0.5)
    ((xx, tt, yy, _),) = net.calls
    assert len(xx) == 3 and torch.equal(yy, y) and torch.equal(out, net.out)


# -----------------------------------------------------------------------------
# sampling: a flow model whose exact denoiser is known in closed form

# data x0 ~ N(MU, S^2): E[x0 | x_t] is linear in x_t, so the probability-flow ODE is too
MU, S = 0.3, 0.5


def exact_velocity(x, t):
    """The flow network that has learnt N(MU, S^2) perfectly: v = (x_t - E[x0 | x_t]) / t."""
    a, s = 1 - t, t
    x0 = MU + a * S**2 / (a * a * S * S + s * s) * (x - a * MU)
    return (x - x0) / s


def test_heun_is_second_order_euler_first():
    # the PF-ODE maps pure noise x (t=1) to the data quantile with the same rank: MU + S x, exactly.
    # Doubling the steps must cut Euler's error ~2x (order 1) and Heun's ~4x (order 2)
    d = Diffusion('flow')
    x = randn(256, dtype=torch.float64)
    exact = MU + S * x
    for sampler, order in [('euler', 1), ('heun', 2)]:
        errs = []
        for steps in (8, 16, 32):
            out, nfe = sample_loop(exact_velocity, x.clone(), d, steps, sampler, spacing='linspace')
            assert nfe == (2 * steps - 1 if sampler == 'heun' else steps)
            errs.append((out - exact).abs().max().item())
        rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert all(order - 0.2 < r < order + 0.25 for r in rates), (sampler, errs, rates)
    # Heun, 32 steps
    assert errs[-1] < 3e-3


def imagen_threshold(x0, ratio, max_value):
    """Dynamic thresholding (Imagen sec. 2.3): s = the ratio-quantile of |x0| per sample, in [1,
    max_value]."""
    s = (
        x0.flatten(1)
        .abs()
        .quantile(ratio, dim=1)
        .clamp(1, max_value)
        .view(-1, *[1] * (x0.dim() - 1))
    )
    return x0.clamp(-s, s) / s


def net_with_x0(d, x0_fn):
    """A network whose data prediction at x is x0_fn(x) (flow: velocity, vp: eps output)."""

    def fn(x, t):
        a, s = (float(v) for v in d.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        return (x - x0_fn(x)) / s if d.objective == 'flow' else (x - a * x0_fn(x)) / s

    return fn


@pytest.mark.parametrize(
    'objective, sampler, spacing',
    [
        ('flow', 'euler', 'linspace'),
        ('flow', 'heun', 'linspace'),
        ('flow', 'dpm++', 'logsnr'),
        ('vp', 'ddim', 'leading'),
        ('vp', 'dpm++', 'logsnr'),
    ],
)
def test_threshold_applies_to_every_x0(objective, sampler, spacing):
    # sampling a wild model with thresholding on == sampling a model whose every x0 is already
    # thresholded
    d = Diffusion(objective, 'linear', 'eps')
    # data predictions far outside [-1, 1]
    wild = lambda x: 4 * x + 2
    x = randn(3, 2, 4, 4, dtype=torch.float64)
    got, _ = sample_loop(
        net_with_x0(d, wild), x, d, 6, sampler, spacing=spacing, threshold=0.9, threshold_max=10.0
    )
    # s is the quantile itself
    tamed = lambda x: imagen_threshold(wild(x), 0.9, 10.0)
    want, _ = sample_loop(net_with_x0(d, tamed), x, d, 6, sampler, spacing=spacing)
    raw, _ = sample_loop(net_with_x0(d, wild), x, d, 6, sampler, spacing=spacing)
    # the last step lands on a thresholded x0
    assert got.abs().max() <= 1 + 1e-6
    # sample.py takes the quantile in float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and thresholding did change the answer
    assert (raw - want).abs().max() > 0.5


@pytest.mark.parametrize('objective', ['flow', 'vp'])
def test_karras_grid_is_edm_rho_7(objective):
    # EDM (Karras et al. 2022, eq. 5): sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) -
    # smax^(1/rho)))^rho, rho = 7, sigma = sigma/alpha from min(start, 80) to 0.002 (flow) or the
    # first training step (vp)
    steps, rho = 10, 7
    d = Diffusion(objective, 'linear', 'eps', T)
    if objective == 'flow':
        # t_max = 1 - 1e-4 is sigma 9999, clamped to 80
        s_min, s_max = 0.002, 80.0
    else:
        ac = alphas_cumprod('linear')
        s_min, s_max = math.sqrt((1 - ac[0]) / ac[0]), min(80.0, math.sqrt((1 - ac[-1]) / ac[-1]))
    i = np.arange(steps) / (steps - 1)
    want = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    ts, alphas, sigmas = d.sampling_schedule(steps, 'karras')
    # the first call is at pure noise
    assert ts[0].item() == (1.0 if objective == 'flow' else T - 1)
    np.testing.assert_allclose((sigmas / alphas)[1:steps].numpy(), want[1:], rtol=1e-9)
    assert alphas[-1] == 1 and sigmas[-1] == 0
    if objective == 'flow':
        np.testing.assert_allclose(ts[1:].numpy(), want[1:] / (1 + want[1:]), rtol=1e-12)


# -----------------------------------------------------------------------------
# conftest.require: a missing reference skips on a laptop, fails in CI


def test_require_skips_or_fails(monkeypatch):
    monkeypatch.delenv('NANODIFFUSION_REQUIRE_REFS', raising=False)
    assert require('math') is math
    with pytest.raises(pytest.skip.Exception):
        require('no_such_module_nanodiffusion')
    monkeypatch.setenv('NANODIFFUSION_REQUIRE_REFS', '1')
    assert require('math') is math
    with pytest.raises(pytest.fail.Exception, match='no_such_module_nanodiffusion is required'):
        require('no_such_module_nanodiffusion')
    with open(os.path.join(ROOT, '.ci', 'run')) as f:
        # CI turns it on
        assert 'NANODIFFUSION_REQUIRE_REFS=1' in f.read()
