"""bench_samplers.py, the exact-answer sampler benchmark: its closed-form mixture denoiser, its
reference ODE solve and its diffusers driver are each checked against something independent of
them."""

import math

import pytest
import torch

import bench_samplers as bs
from bench_mixtures import mixture_x0
from diffusion import Diffusion
from samplers import sample_loop
from conftest import require

pytestmark = pytest.mark.usefixtures('one_thread')


def noise(n=64, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gaussian():
    """A one-component mixture: data N(mu, 0.5^2 I), where everything has a closed form."""
    return bs.make_mixture(dims=8, components=1, classes=1, std_min=0.5, std_max=0.5)


def gaussian_end_point(x, alpha, sigma, mu, s):
    """The probability-flow ODE maps x at (alpha, sigma) to mu + s (x - alpha mu) / sqrt(alpha^2 s^2
    + sigma^2)."""
    return mu + s * (x - alpha * mu) / math.sqrt(alpha**2 * s**2 + sigma**2)


@pytest.mark.parametrize('alpha, sigma', [(0.9, 0.3), (0.1, 1.0), (1.0, 0.01)])
def test_one_component_is_the_gaussian_posterior_mean(alpha, sigma):
    mix, x = gaussian(), noise()
    mu, s = mix.mu[0], mix.std[0]
    exact = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x - alpha * mu)
    torch.testing.assert_close(mixture_x0(x, alpha, sigma, mix), exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize('alpha, sigma', [(0.99, 0.02), (0.8, 0.2), (0.5, 0.8), (0.01, 1.0)])
@pytest.mark.parametrize('conditional', [False, True])
def test_posterior_mean_is_tweedie(alpha, sigma, conditional):
    """Tweedie's formula, E[x0 | x_t] = (x_t + sigma^2 grad log p(x_t)) / alpha, with the gradient
    of the closed-form marginal density (a mixture of N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I))
    taken by autograd."""
    mix = bs.make_mixture(dims=16, components=6, classes=3, std_min=0.02, std_max=0.5)
    labels = torch.arange(64) % 3 if conditional else None
    x0 = mix.mu[torch.arange(64) % 6] + mix.std[torch.arange(64) % 6, None] * noise(64, 16, 1)
    x = (alpha * x0 + sigma * noise(64, 16, 2)).requires_grad_()
    var = alpha**2 * mix.std**2 + sigma**2
    logp = (
        mix.logw
        - 0.5 * x.shape[1] * var.log()
        - 0.5 * (x[:, None] - alpha * mix.mu).pow(2).sum(-1) / var
    )
    if conditional:
        logp = logp.masked_fill(mix.labels != labels[:, None], -math.inf)
    (grad,) = torch.autograd.grad(logp.logsumexp(1).sum(), x)
    tweedie = (x + sigma**2 * grad) / alpha
    torch.testing.assert_close(
        mixture_x0(x.detach(), alpha, sigma, mix, labels),
        tweedie.detach(),
        rtol=0,
        atol=1e-9 / alpha,
    )


@pytest.mark.parametrize('objective', ['vp-linear', 'flow'])
def test_cfg_on_x0_is_cfg_on_the_network_output(objective):
    diffusion = Diffusion(*bs.OBJECTIVES[objective])
    mix, x = bs.make_mixture(dims=8), noise()
    labels = torch.arange(64) % 4
    t = 0.4 if objective == 'flow' else 400.0
    cond, uncond = (
        bs.exact_net(diffusion, mix, labels)(x, t),
        bs.exact_net(diffusion, mix, None)(x, t),
    )
    torch.testing.assert_close(
        bs.exact_net(diffusion, mix, labels, 3.0)(x, t), uncond + 3 * (cond - uncond)
    )


@pytest.mark.parametrize('objective', ['vp-cosine', 'flow'])
def test_reference_is_the_gaussian_end_point(objective):
    """From pure noise (flow: alpha = 0, the start no finite log-SNR reaches) as from vp's last
    training step."""
    mix, x = gaussian(), noise()
    alpha, sigma = bs.start(Diffusion(*bs.OBJECTIVES[objective]))
    exact = gaussian_end_point(x, alpha, sigma, mix.mu[0], mix.std[0])
    assert bs.rms(bs.reference(x, alpha, sigma, mix, None, steps=500), exact) < 1e-6


def test_reference_converges_and_agrees_with_our_sampler():
    """On the mixture, with CFG: 300 vs 600 RK4 steps move it by far less than any sampler error,
    and our 3rd-order DPM-Solver++ with 400 steps (independent code) lands on it up to its final
    step from t = 0.002 to 0."""
    mix, x, labels = bs.make_mixture(dims=8), noise(), torch.arange(64) % 4
    diffusion = Diffusion('flow')
    ref = bs.reference(x, 0.0, 1.0, mix, labels, 3.0, steps=600)
    assert bs.rms(ref, bs.reference(x, 0.0, 1.0, mix, labels, 3.0, steps=300)) < 1e-5
    ours, _ = sample_loop(
        bs.exact_net(diffusion, mix, labels, 3.0), x, diffusion, 400, 'dpm++', 3, 'logsnr'
    )
    assert bs.rms(ours, ref) < 2e-4


# (objective, configuration, tolerance), about 3x the error measured at 200 NFE: first-order
# schedulers converge slowly; the flow schedulers that pass integer timesteps call the model up to
# 1/1000 off their own sigma
DRIVER_CASES = [
    ('vp-linear', 'DPM++ 2M (default)', 3e-4),
    ('vp-linear', 'UniPC bh2', 2e-3),
    ('vp-linear', 'Euler', 2e-2),
    ('vp-linear', 'Heun karras', 2e-3),
    ('vp-linear', 'DDIM trailing', 2e-2),
    ('vp-cosine', 'UniPC 3', 1e-3),
    ('flow', 'UniPC bh2 flow sigmas', 2e-3),
    ('flow', 'FlowMatchEuler', 1e-2),
    ('flow', 'FlowMatchHeun', 1e-4),
]


@pytest.mark.parametrize('objective, row, tol', DRIVER_CASES)
def test_diffusers_driver_reaches_the_gaussian_end_point(objective, row, tol):
    """Driven as a pipeline drives it (init_noise_sigma, scale_model_input, its timesteps), each
    scheduler lands on the closed-form end point of the ODE from its own first time at 200 NFE."""
    require('diffusers')
    diffusion = Diffusion(*bs.OBJECTIVES[objective])
    mix, x = gaussian(), noise()
    cls_name, kwargs = next(
        (c, kw) for r, c, kw in bs.diffusers_configs(*bs.OBJECTIVES[objective]) if r == row
    )
    out, t0 = bs.run_diffusers(
        bs.exact_net(diffusion, mix, None), x, diffusion, 200, cls_name, kwargs
    )
    alpha, sigma = (v.item() for v in diffusion.alpha_sigma(torch.tensor(t0, dtype=torch.float64)))
    assert bs.rms(out, gaussian_end_point(x, alpha, sigma, mix.mu[0], mix.std[0])) < tol


def test_diffusers_driver_is_our_sampler_on_the_same_grid():
    """diffusers' DPMSolverMultistep default is 2M on the time-uniform 'linspace' grid, as is ours
    with that spacing: on the (nonlinear) mixture the two agree up to diffusers' float32 steps."""
    require('diffusers')
    diffusion = Diffusion(*bs.OBJECTIVES['vp-linear'])
    mix, x, labels = bs.make_mixture(dims=8), noise(), torch.arange(64) % 4
    net = bs.exact_net(diffusion, mix, labels, 3.0)
    _, cls_name, kwargs = bs.diffusers_configs(*bs.OBJECTIVES['vp-linear'])[0]
    theirs, _ = bs.run_diffusers(net, x, diffusion, 10, cls_name, kwargs)
    ours, _ = sample_loop(net, x, diffusion, 10, 'dpm++', 2, 'linspace')
    assert bs.rms(theirs, ours) < 1e-6


def test_bench_tables(monkeypatch, capsys):
    """The whole pipeline on a small problem: every configuration gives a row, the default's error
    falls with NFE, and the tables print."""
    monkeypatch.setattr(bs, 'nfes', (5, 10))
    monkeypatch.setattr(bs, 'ref_steps', 300)
    monkeypatch.setattr(bs, 'tune_samples', 128)
    monkeypatch.setattr(bs, 'tune_iters', 30)
    mix, x, labels = bs.make_mixture(dims=8), noise(), torch.arange(64) % 4
    results = {}
    for w in (1.0, 3.0):
        results[('flow', w)], gap = bs.bench('flow', w, mix, x, labels)
        assert gap < 1e-4
    rows = results[('flow', 1.0)]
    names = [r[0] for r in rows]
    default = bs.default_config('flow')
    assert (
        names[0] == bs.our_name(*default, default)
        and names[1] == 'unipc3 tuned solver'
        and len(names) == len(set(names))
    )
    assert all(math.isfinite(e) for r in rows for e in r[2]) and all(0.5 < r[3] < 2 for r in rows)
    assert rows[0][2][1] < rows[0][2][0]
    bs.print_table('flow', {1.0: results[('flow', 1.0)], 3.0: results[('flow', 3.0)]})
    bs.print_ratios(results)
    out = capsys.readouterr().out
    assert 'unipc3 flowtime|logsnr (default)' in out and 'our error / the best diffusers' in out


def test_held_out_mixtures_score_on_noise_no_fit_saw(monkeypatch, capsys):
    """--mixtures: none of the mixtures is the benchmark's own, and each differs from the others;
    the fit sees three noise batches (fit, select, check) and the errors are measured on a fourth;
    where the fit is not kept the untuned solver is what is scored; the table prints."""
    require('diffusers')
    import bench_mixtures as bm

    mixes = [bm.held_out_mixture(i)[0] for i in range(3)]
    own = bs.make_mixture()
    shapes = {
        (m.mu.shape, round(m.std.min().item(), 6), round(m.std.max().item(), 6)) for m in mixes
    }
    assert len(shapes) == 3 and all(m.mu.shape != own.mu.shape for m in mixes)
    torch.testing.assert_close(bm.held_out_mixture(1)[0].mu, mixes[1].mu, rtol=0, atol=0)
    seen, real = [], bm.tune_solver

    def tune(model_fn, x, x_val, *args, **kw):
        seen.append((x, x_val, kw['x_check']))
        return real(model_fn, x, x_val, *args, **kw)

    monkeypatch.setattr(bm, 'tune_solver', tune)
    scored, sample = [], bm.sample_loop

    def loop(net, x, *args, **kw):
        scored.append(x)
        return sample(net, x, *args, **kw)

    monkeypatch.setattr(bm, 'sample_loop', loop)
    # fit and select on batches twice the scoring batch's size, checked on as many
    results, gap = bm.held_out(1, 32, (5,), 200, 10, check=2, fit=2)
    assert len(seen) == 3 and gap < 1e-3
    assert all(len(x) == len(x_val) == len(x_check) == 64 for x, x_val, x_check in seen)
    assert all(len(x) == 32 for x in scored)
    fitted_on = [id(x) for batches in seen for x in batches]
    assert scored and not any(id(x) in fitted_on for x in scored)
    cells = [c for cells in results.values() for c in cells]
    assert all(c['fitted'] == c['untuned'] for c in cells if not c['used'])
    bm.print_held_out(results, gap, 200, 32, check=2, fit=2)
    out = capsys.readouterr().out
    assert 'median  worst (mix)' in out and 'vp-cosine    5' in out and 'fitted on 64' in out


def test_shared_matrix_keeps_the_iterate_that_wins_on_other_mixtures():
    """bench_transfer.fit_shared: fitted on some mixtures, the matrix it returns is the iterate
    with the lowest worst error ratio on others (recomputed here); one that never goes below the
    untuned solver there (lr 0) gives back the untuned matrix itself."""
    import bench_mixtures
    import bench_transfer as bm
    from samplers import default_solver, solver_matrix

    diffusion = Diffusion(*bench_mixtures.OBJECTIVES['flow'])
    train = bm.problems('flow', 2, 5000, 9000, 0, 32, 200)
    select = bm.problems('flow', 2, 6000, 9500, 0, 32, 200)
    held = bm.problems('flow', 1, 0, 2000, 2, 32, 200)
    # three disjoint sets of mixtures
    assert len({p[1].shape[1] for p in train + select + held}) == 5
    d = default_solver('flow', 5)
    start = solver_matrix(diffusion, 5, d['sampler'], d['order'], d['spacing'])

    def err(p, matrix):
        out = sample_loop(p[0], p[1], diffusion, 5, spacing=d['spacing'], matrix=matrix)[0]
        return (out - p[2]).pow(2).mean().sqrt().item()

    matrix, worst = bm.fit_shared(diffusion, 5, train, select, 50)
    assert worst < 1 and not torch.equal(matrix, start)
    assert worst == pytest.approx(max(err(p, matrix) / err(p, start) for p in select), rel=1e-9)
    same, worst = bm.fit_shared(diffusion, 5, train, select, 50, lr=0.0)
    assert worst == 1.0 and torch.equal(same, start)


def test_shared_and_warp_need_held_out_mixtures(monkeypatch):
    from conftest import one_line_exit

    # the check batch goes through the fit's batches: a multiple of them
    monkeypatch.setattr(bs, 'mixture_check', 3)
    one_line_exit(bs.check_config, '--mixture_check=3', '--mixture_fit=4')
    monkeypatch.setattr(bs, 'mixture_check', 4)

    for key in ('shared', 'warp'):
        monkeypatch.setattr(bs, key, True)
        monkeypatch.setattr(bs, 'mixtures', 0)
        one_line_exit(bs.check_config, '--mixtures=6')
        monkeypatch.setattr(bs, key, False)


def test_shared_table_writes_what_it_fitted(tmp_path, capsys):
    """bench_transfer.shared_table --shared_out: each objective's matrix and the grid it runs on,
    read back equal to what it returned and printed a row for."""
    import json

    import bench_mixtures as bm
    from bench_transfer import shared_table
    from samplers import solver_matrix

    out = tmp_path / 'shared.json'
    table = shared_table(1, 16, (5,), 100, 25, train=2, peers=False, out=str(out))
    saved = json.loads(out.read_text())
    assert saved and set(saved) <= {f"{name} 5" for name in bm.OBJECTIVES}
    for (name, n), matrix in table.items():
        diffusion = Diffusion(*bm.OBJECTIVES[name])
        fit = saved.get(f"{name} {n}")
        # only a matrix that won on the selection mixtures is written; the others are untuned
        if fit is None:
            untuned = solver_matrix(diffusion, n, 'unipc', 3, 'flowtime')
            assert torch.equal(matrix, untuned)
            continue
        assert torch.equal(torch.tensor(fit['matrix'], dtype=torch.float64), matrix)
        t = diffusion.sampling_schedule(n, 'flowtime')[0]
        assert fit['t'] == t.tolist() and 0 < fit['select_worst'] < 1
    assert capsys.readouterr().out.count('    5  ') == 3
