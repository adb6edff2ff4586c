"""The control branch (ControlNet for the UNet, PixArt-delta's for the DiT): it starts as exactly
the base model, only it trains, its strength scales, and a checkpoint with it loads and samples."""

import functools
import io

import pytest
import torch

from conftest import one_line_exit
from diffusion import Diffusion
from samplers import guided, sample_loop
from model import build_model, freeze_base

pytestmark = pytest.mark.usefixtures('one_thread')

# tiny models: pixel ones with a pixel-size hint, and latent ones (4x8x8, a 64-pixel hint) with
# captions; the latent DiT shares blocks and copies 3 layers, so copy i comes from base block i // 2
CASES = {
    'dit': dict(
        arch='dit',
        input_size=16,
        in_channels=3,
        patch_size=4,
        n_layer=3,
        n_head=2,
        n_embd=32,
        num_classes=3,
        hint_channels=1,
        hint_size=16,
    ),
    'unet': dict(
        arch='unet',
        input_size=16,
        in_channels=3,
        channels=8,
        channel_mult=(1, 2),
        n_head=2,
        num_classes=3,
        hint_channels=1,
        hint_size=16,
    ),
    'dit-latent': dict(
        arch='dit',
        input_size=8,
        in_channels=4,
        patch_size=2,
        n_layer=4,
        share=2,
        n_head=2,
        n_embd=32,
        text_dim=8,
        hint_channels=1,
        hint_size=64,
        control_blocks=3,
    ),
    'unet-latent': dict(
        arch='unet',
        input_size=8,
        in_channels=4,
        channels=8,
        channel_mult=(1, 2),
        n_head=2,
        text_dim=8,
        hint_channels=1,
        hint_size=64,
    ),
}
HINT_KEYS = ('hint_channels', 'hint_size', 'control_blocks')


def base_args(args):
    return {k: v for k, v in args.items() if k not in HINT_KEYS}


def perturb(params, std=0.05):
    """Move weights off their zero-init, so that every path reaches the output."""
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn_like(p))


def branch(model):
    """The parameters of the branch's parts other than its zero links."""
    return [p for n, p in model.control.named_parameters() if not n.startswith('zero.')]


def make(name, seed=0):
    """(base model, controlled model with the same base weights, perturbed off zero), the inputs,
    and a hint."""
    args = CASES[name]
    torch.manual_seed(seed)
    base = build_model(base_args(args))
    torch.manual_seed(seed)
    model = build_model(args)
    base_sd = base.state_dict()
    # the same seed builds the same base: the branch is created after it
    for k, v in model.state_dict().items():
        assert k.startswith('control.') or torch.equal(v, base_sd[k]), k
    perturb(base.parameters())
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert missing and all(k.startswith('control.') for k in missing) and not unexpected
    B, C, S = 3, args['in_channels'], args['input_size']
    g = torch.Generator().manual_seed(seed + 1)
    x, t = torch.randn(B, C, S, S, generator=g), torch.rand(B, generator=g) * 1000
    y = torch.tensor([0, 1, 3]) if args.get('num_classes') else torch.zeros(B, dtype=torch.long)
    text = None
    if args.get('text_dim'):
        # caption lengths 5, 3, 1
        mask = torch.arange(5) < torch.tensor([[5], [3], [1]])
        text = (
            torch.randn(B, 5, args['text_dim'], generator=g),
            mask,
            torch.randn(B, args['text_dim'], generator=g),
        )
    hint = torch.rand(B, 1, args['hint_size'], args['hint_size'], generator=g)
    return base, model, (x, t, y, text), hint


@pytest.mark.parametrize('name', CASES)
def test_starts_as_exactly_the_base_model(name):
    base, model, inputs, hint = make(name)
    # everything in the branch but its zero links: those alone must keep it silent
    perturb(branch(model))
    with torch.no_grad():
        want = base(*inputs)
        # the base's output layer is off zero, so a leaking branch would show
        assert want.abs().min() > 0
        assert torch.equal(model(*inputs, hint=hint), want)
        assert torch.equal(model(*inputs), want)
        # ControlNet: the copy starts as the base's encoder
        model.init_control_from_base()
        # copy i of base block i // share
        if name.startswith('dit'):
            pairs = [
                (b, model.blocks[i // CASES[name].get('share', 1)])
                for i, b in enumerate(model.control.blocks)
            ]
        else:
            pairs = [(getattr(model.control, n), getattr(model, n)) for n in model.copied()]
        for copy, block in pairs:
            for (k, a), b in zip(copy.state_dict().items(), block.state_dict().values()):
                assert torch.equal(a, b) and (a.dim() < 2 or a.abs().sum() > 0), k
        assert torch.equal(model(*inputs, hint=hint), want)


def loss_and_grads(model, inputs, hint):
    model.zero_grad()
    model(*inputs, hint=hint).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('name', CASES)
def test_only_the_branch_trains(name):
    base, model, inputs, hint = make(name)
    model.init_control_from_base()
    params = freeze_base(model)
    assert len(params) == len([n for n, _ in model.named_parameters() if n.startswith('control.')])
    grads = loss_and_grads(model, inputs, hint)
    assert set(grads) == {n for n, _ in model.named_parameters() if n.startswith('control.')}
    for n, g in grads.items():
        if n.startswith('control.zero.') and n.endswith('weight'):
            # the zero links learn first ...
            assert g.abs().sum() > 0, n
        if n.startswith('control.hint.'):
            # ... the rest once they are off zero (as in ControlNet)
            assert g.abs().sum() == 0, n
    model.train()
    # the branch's blocks are checkpointed too: the same gradients
    model.grad_checkpoint = True
    for n, g in loss_and_grads(model, inputs, hint).items():
        torch.testing.assert_close(g, grads[n], rtol=1e-5, atol=1e-7)
    opt = torch.optim.SGD(params, lr=0.5)
    opt.step()
    grads = loss_and_grads(model, inputs, hint)
    # its zero conv, as the zero links are off zero now
    last = f'control.hint.{len(model.control.hint) - 1}.weight'
    assert grads[last].abs().sum() > 0
    with torch.no_grad():
        want = base(*inputs)
        assert not torch.allclose(model(*inputs, hint=hint), want)
        # the base itself did not move
        assert torch.equal(model(*inputs), want)


@pytest.mark.parametrize('name', CASES)
def test_control_scale(name):
    base, model, inputs, hint = make(name)
    perturb(model.control.parameters())
    with torch.no_grad():
        want = base(*inputs)
        one = model(*inputs, hint=hint)
        assert not torch.allclose(one, want)
        assert torch.equal(model(*inputs, hint=hint, control_scale=0.0), want)
        assert torch.equal(model(*inputs, hint=hint, control_scale=torch.zeros(3)), want)
        # the hint matters
        assert not torch.allclose(model(*inputs, hint=hint.flip(0)), one)
        # the strength multiplies the branch's additions: scale 2 = zero links twice as large at
        # scale 1 (the output itself is not linear in it: the additions pass the base's later,
        # nonlinear layers)
        two = model(*inputs, hint=hint, control_scale=2.0)
        per_sample = model(*inputs, hint=hint, control_scale=torch.tensor([0.0, 1.0, 2.0]))
        for p in model.control.zero.parameters():
            p.mul_(2)
        torch.testing.assert_close(two, model(*inputs, hint=hint), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(two, one)
        torch.testing.assert_close(
            per_sample, torch.stack([want[0], one[1], two[2]]), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize('name', CASES)
def test_the_copy_sees_the_input_plus_the_hint(name):
    base, model, inputs, hint = make(name)
    perturb(model.control.parameters())
    k, dit = model.control, name.startswith('dit')
    first = (
        (model.blocks[0], k.blocks[0])
        if dit
        else (model.down[0]['blocks'][0], k.down[0]['blocks'][0])
    )
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for m in first]
    with torch.no_grad():
        model(*inputs, hint=hint)
        h = k.hint(hint)
    for hook in hooks:
        hook.remove()
    # the base's tokens plus the hint's; the UNet: the copy's conv_in(x) plus the hint's embedding
    if dit:
        torch.testing.assert_close(seen[1], seen[0] + h.flatten(2).transpose(1, 2))
    else:
        torch.testing.assert_close(seen[1], k.conv_in(inputs[0]) + h)


@pytest.mark.parametrize('name', CASES)
def test_checkpoint_round_trip_and_sampling(name):
    args = CASES[name]
    base, model, inputs, hint = make(name)
    perturb(model.control.parameters())
    buf = io.BytesIO()
    torch.save({'model': model.state_dict(), 'model_args': args}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    again = build_model(ckpt['model_args'])
    # strict
    again.load_state_dict(ckpt['model'])
    with torch.no_grad():
        assert torch.equal(again(*inputs, hint=hint), model(*inputs, hint=hint))
    # an old checkpoint's model_args: the old model, no branch
    old = build_model(base_args(args))
    assert not hasattr(old, 'control')
    assert set(old.state_dict()) == {k for k in model.state_dict() if not k.startswith('control.')}
    with pytest.raises(AssertionError, match='without a control branch'):
        old(*inputs, hint=hint)
    # sampling with a hint: the same sampler, the hint bound to the network
    d, x = (
        Diffusion('flow'),
        torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)),
    )
    y, text = inputs[2], inputs[3]
    with torch.no_grad():
        plain, _ = sample_loop(guided(base, d, y, 0, 1.0, text), x, d, 3)
        controlled, _ = sample_loop(
            guided(functools.partial(again, hint=hint), d, y, 0, 1.0, text), x, d, 3
        )
        off, _ = sample_loop(
            guided(functools.partial(again, hint=hint, control_scale=0), d, y, 0, 1.0, text),
            x,
            d,
            3,
        )
    assert torch.isfinite(controlled).all() and not torch.allclose(controlled, plain)
    assert torch.equal(off, plain)


def test_bad_hint_size_is_one_line():
    one_line_exit(lambda: build_model(dict(CASES['unet'], hint_size=24)), 'hint_size 24', '16')
    one_line_exit(lambda: build_model(dict(CASES['dit'], hint_size=2)), 'hint_size 2', '4 (the')
    one_line_exit(lambda: build_model(dict(CASES['dit'], control_blocks=9)), 'control_blocks 9')
