"""
The layers both denoisers share (model.py's DiT and unet.py's UNet): gradient checkpointing, the
timestep's features, caption cross-attention, and the control branch's and the CFG-scale input's
parts. Below both, so that either imports them without a cycle.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def run_block(model, block, *args):
    """block(*args), or with gradient checkpointing: its activations are recomputed in backward
    instead of kept, trading ~30% more compute for memory (model.grad_checkpoint, set by
    train.py)."""
    if model.grad_checkpoint and model.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def timestep_embedding(t, dim, max_period=10000, shift=0):
    """Sinusoidal features of a (float) timestep on a 0..1000 scale, as in DDPM/DiT: frequencies
    max_period^(-k / (dim/2 - shift)); shift 1 is diffusers' DiT (downscale_freq_shift=1)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - shift)
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padded caption positions are masked out."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.q, self.kv, self.proj = (
            nn.Linear(n_embd, n_embd),
            nn.Linear(n_embd, 2 * n_embd),
            nn.Linear(n_embd, n_embd),
        )

    def forward(self, x, ctx, mask):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k, v = (
            self.kv(ctx)
            .view(B, ctx.shape[1], 2, self.n_head, C // self.n_head)
            .permute(2, 0, 3, 1, 4)
        )
        # mask: True = a real token
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TextCond(nn.Module):
    """Pre-encoded captions -> (tokens at the attention width, their mask, the pooled caption at the
    condition width, added to the timestep embedding). Both the DiT and the UNet take text through
    this."""

    def __init__(self, text_dim, width, cond_dim):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(text_dim, width), nn.GELU(approximate='tanh'), nn.Linear(width, width)
        )
        self.pooled = nn.Linear(text_dim, cond_dim)

    def forward(self, text):
        states, mask, pooled = text
        return self.proj(states), mask, self.pooled(pooled)


# -----------------------------------------------------------------------------
# The control branch's shared parts. It starts with no effect (its links are zero) and trains with
# the base frozen, so the base model is never harmed and the branch's strength can be scaled at
# sampling.


def zero_init(m):
    """m with a zero weight and bias: the branch's links into the base (ControlNet's zero
    convolutions)."""
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


def hint_encoder(cin, width, hint_size, size):
    """ControlNet's input hint block: the pixel-resolution hint down to the model's resolution
    `size` (a latent model's too) by stride-2 convs, into `width` channels through a zero conv."""
    steps = (hint_size // size).bit_length() - 1
    ok = steps >= 0 and hint_size == size << steps
    assert ok, f"hint_size {hint_size} is not {size} (the model's grid) times a power of 2"
    layers, ch = [nn.Conv2d(cin, 16, 3, padding=1), nn.SiLU()], 16
    # each halves the side and doubles the width, up to 256
    for _ in range(steps):
        layers += [nn.Conv2d(ch, min(2 * ch, 256), 3, stride=2, padding=1), nn.SiLU()]
        ch = min(2 * ch, 256)
    return nn.Sequential(*layers, zero_init(nn.Conv2d(ch, width, 3, padding=1)))


def control_on(model, hint, scale):
    """Whether forward runs the branch: not without a hint or at strength 0 (then it is exactly the
    base model)."""
    if hint is None or (not torch.is_tensor(scale) and scale == 0):
        return False
    assert hasattr(model, 'control'), (
        "a hint was given to a model without a control branch (hint_channels=0)"
    )
    return True


def scaled(out, scale):
    """A branch's addition times its strength: a number, or a [B] tensor (one strength per
    sample)."""
    if torch.is_tensor(scale):
        scale = scale.to(out.dtype).view(-1, *[1] * (out.dim() - 1))
    return out * scale


def guidance_embedding(width):
    """A guidance-distilled student's CFG-scale input (Meng et al. 2023), as FLUX-dev has one:
    sinusoidal features of the scale into the condition vector through a zero last layer, so the
    student starts as its teacher's model."""
    return nn.Sequential(nn.Linear(256, width), nn.SiLU(), zero_init(nn.Linear(width, width)))


def augment_in(model, aug, dtype):
    """The augmentation labels' term of the condition vector (augment.py): 0 for a model without
    the input, and for aug None, which is what sampling passes: no transform applied."""
    if model.a_embed is None or aug is None:
        return 0
    return model.a_embed(aug.to(dtype))


def guidance_in(model, scale, t, dtype):
    """The CFG scale's term of the condition vector (0 for a model without the input); no scale is 1
    (no guidance)."""
    if model.g_embed is None:
        return 0
    scale = (
        torch.ones_like(t, dtype=torch.float32) if scale is None else scale.float().expand(len(t))
    )
    # scales 0-10 spread like times 0-1000
    return model.g_embed(timestep_embedding(100 * scale, 256).to(dtype))
