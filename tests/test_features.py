"""Training options: gradient checkpointing, parameter sharing, Min-SNR weighting, LR restarts,
Adafactor, profiling."""

import os
import subprocess
import sys

import pytest
import torch

import train
from diffusion import Diffusion
from model import DiT, DiTConfig, UNet, UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grads(model, x, t, y):
    model.zero_grad()
    out = model(x, t, y)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    'make',
    [
        lambda: DiT(DiTConfig(16, 3, 4, 2, 2, 32, num_classes=3)),
        lambda: UNet(UNetConfig(16, 3, 8, (1, 2), 1, 2, 3)),
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(make):
    torch.manual_seed(0)
    model = make()
    # leave the zero-init so every gradient is non-trivial
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(4, 3, 16, 16), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 3])
    out_a, g_a = grads(model, x, t, y)
    model.grad_checkpoint = True
    out_b, g_b = grads(model, x, t, y)
    assert torch.equal(out_a, out_b)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_parameter_sharing_across_depth():
    shared = DiT(DiTConfig(16, 3, 4, n_layer=4, n_head=2, n_embd=32, share=2))
    half = DiT(DiTConfig(16, 3, 4, n_layer=2, n_head=2, n_embd=32))
    assert len(shared.blocks) == 2
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in half.parameters())
    # the same weights ...
    half.load_state_dict(shared.state_dict())
    for p in shared.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    half.load_state_dict(shared.state_dict())
    x, t, y = (
        torch.randn(2, 3, 16, 16),
        torch.tensor([10.0, 500.0]),
        torch.zeros(2, dtype=torch.long),
    )
    # ... applied twice as often
    assert not torch.allclose(shared(x, t, y), half(x, t, y))


def test_min_snr_weights():
    t = torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    for prediction, expect in (
        ('eps', lambda s: s.clamp(max=5) / s),
        ('v', lambda s: s.clamp(max=5) / (s + 1)),
        ('x0', lambda s: s.clamp(max=5)),
    ):
        d = Diffusion('vp', 'linear', prediction)
        a, s = d.alpha_sigma(t)
        torch.testing.assert_close(d.min_snr_weight(t, 5.0), expect((a / s) ** 2).float())
    d, tf = Diffusion('flow'), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    snr = ((1 - tf) / tf) ** 2
    torch.testing.assert_close(d.min_snr_weight(tf, 5.0), (snr.clamp(max=5) * tf**2).float())


def test_cosine_warm_restarts(monkeypatch):
    for k, v in dict(
        lr_schedule='restarts', lr=1.0, min_lr=0.0, warmup_iters=10, restart_iters=100
    ).items():
        monkeypatch.setattr(train, k, v)
    # each cycle restarts
    assert train.get_lr(10) == 1.0 and train.get_lr(110) == 1.0 and train.get_lr(210) == 1.0
    assert train.get_lr(60) == pytest.approx(0.5) and train.get_lr(109) < 0.01


def test_adafactor_profile_and_memory_savers_train(tmp_path):
    d, out = tmp_path / 'd', tmp_path / 'o'
    env = dict(os.environ, OMP_NUM_THREADS='1', TQDM_DISABLE='1')
    subprocess.run(
        [sys.executable, 'prepare.py', '--num_train=64', '--num_val=8', f'--out_dir={d}'],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    p = subprocess.run(
        [
            sys.executable,
            'train.py',
            f'--data_dir={d}',
            f'--out_dir={out}',
            '--patch_size=4',
            '--n_layer=4',
            '--share_blocks=2',
            '--grad_checkpoint=True',
            '--n_head=2',
            '--n_embd=32',
            '--batch_size=8',
            '--max_iters=30',
            '--lr=3e-3',
            '--warmup_iters=2',
            '--optim=adafactor',
            '--min_snr_gamma=5.0',
            '--profile=True',
            '--log_interval=1',
            '--sample_steps=2',
            '--device=cpu',
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    losses = [float(l.split('loss ')[1].split()[0]) for l in p.stdout.splitlines() if '| lr' in l]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert (out / 'trace.json').stat().st_size > 1000


@pytest.mark.parametrize('arch', ['dit', 'unet'])
def test_cross_attention_to_captions_ignores_padding(arch):
    torch.manual_seed(0)
    model = (
        DiT(DiTConfig(16, 3, 4, n_layer=2, n_head=2, n_embd=32, text_dim=24))
        if arch == 'dit'
        else UNet(UNetConfig(16, 3, channels=16, channel_mult=(1, 2), n_head=2, text_dim=24))
    )
    # past the zero-init, so the text path matters
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = (
        torch.randn(2, 3, 16, 16),
        torch.tensor([100.0, 700.0]),
        torch.zeros(2, dtype=torch.long),
    )
    states, pooled = torch.randn(2, 8, 24), torch.randn(2, 24)
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    out = model(x, t, y, (states, mask, pooled))
    garbage = states.clone()
    # change only the padded positions of the first caption
    garbage[0, 5:] = 100 * torch.randn(3, 24)
    torch.testing.assert_close(model(x, t, y, (garbage, mask, pooled)), out)
    other = states.clone()
    # a real token does matter
    other[0, 0] += 1.0
    assert not torch.allclose(model(x, t, y, (other, mask, pooled))[0], out[0])
    model.grad_checkpoint = True
    model(x, t, y, (states, mask, pooled)).square().mean().backward()
    cross = model.blocks[0].cross if arch == 'dit' else model.cross
    assert cross.q.weight.grad.abs().sum() > 0


def test_dit_residual_stream_stays_bf16_under_autocast():
    """The fp32 position embedding must not promote the residual stream: every block reads and
    writes bf16."""
    model = DiT(
        DiTConfig(input_size=8, in_channels=4, n_layer=2, n_head=2, n_embd=32, num_classes=3)
    )
    seen = []
    for b in model.blocks:
        b.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(torch.randn(2, 4, 8, 8), torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2


def test_unet_attention_feeds_sdpa_unit_stride_tokens(monkeypatch):
    """SDPA's fused kernels need a unit last stride on q, k, v (else the math kernel and its HW x HW
    matrix); the same output with a channels_last model and input."""
    import model as model_mod

    strides, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        model_mod.F,
        'scaled_dot_product_attention',
        lambda q, k, v, **kw: (
            strides.append((q.stride(-1), k.stride(-1), v.stride(-1))) or sdpa(q, k, v, **kw)
        ),
    )
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            input_size=8, in_channels=3, channels=16, channel_mult=(1, 2), n_head=2, num_classes=3
        )
    )
    # the zero-initialised output convs would hide the attention
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 3, 8, 8), torch.ones(2), torch.zeros(2, dtype=torch.long)
    out = unet(x, t, y)
    out_cl = unet.to(memory_format=torch.channels_last)(
        x.to(memory_format=torch.channels_last), t, y
    )
    assert strides and set(strides) == {(1, 1, 1)}
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
