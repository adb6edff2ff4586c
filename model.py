"""
The denoisers (a DiT, and a small UNet), built from the dict a checkpoint stores, and the
device/precision choice. The diffusion math and the samplers are in diffusion.py.

References:
- DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023), facebookresearch/DiT.
- UNet: Ronneberger et al. (2015), in the ADM form of Dhariwal & Nichol (2021).
- Control branch: Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models"
  (ControlNet, 2023) for the UNet; Chen et al., "PixArt-delta" (2024), section 3, for the DiT.
"""

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# DiT

# name -> (n_layer, n_head, n_embd), as in the DiT paper; the patch size is the suffix, e.g. 'B/2'
DIT_SIZES = {'S': (12, 6, 384), 'B': (12, 12, 768), 'L': (24, 16, 1024), 'XL': (28, 16, 1152)}


@dataclass
class DiTConfig:
    # side of the (pixel or latent) input
    input_size: int = 32
    in_channels: int = 3
    patch_size: int = 2
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 384
    mlp_ratio: float = 4.0
    # 0 = unconditional; index num_classes is the null ("no label") class for CFG
    num_classes: int = 0
    # each block's weights serve `share` consecutive layers (ALBERT-style): 1 = none
    share: int = 1
    # width of pre-encoded caption tokens; > 0 adds cross-attention to them (0 = no text)
    text_dim: int = 0
    # > 0 adds a control branch for a [B, hint_channels, hint_size, hint_size] hint (0 = none)
    hint_channels: int = 0
    # the hint's side in pixels: input_size, or 8 x input_size for an SD-VAE latent model
    hint_size: int = 0
    # base blocks the branch copies; 0 = half the depth (PixArt-delta copies 13 of 28)
    control_blocks: int = 0
    # the CFG scale is an input (a guidance-distilled student: one call per step, no uncond half)
    guidance: bool = False


def run_block(model, block, *args):
    """block(*args), or with gradient checkpointing: its activations are recomputed in backward
    instead of kept, trading ~30% more compute for memory (model.grad_checkpoint, set by
    train.py)."""
    if model.grad_checkpoint and model.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of a (float) timestep on a 0..1000 scale, as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(n_embd, grid):
    """Fixed 2-D sin-cos position embedding [grid*grid, n_embd] (MAE/DiT): half the channels per
    axis."""

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing='ij',
    )
    return torch.cat([one_axis(n_embd // 2, xs), one_axis(n_embd // 2, ys)], dim=1).float()


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # flash / memory-efficient kernel where available
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


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


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the condition sets per-channel shift/scale/gate of each
    branch, and the gates start at zero so every block starts as the identity (DiT section 3.2)."""

    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=1e-6)
        hidden = int(c.n_embd * c.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, hidden), nn.GELU(approximate='tanh'), nn.Linear(hidden, c.n_embd)
        )
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(c.n_embd, 6 * c.n_embd))
        # PixArt-style: un-modulated cross-attention between self-attention and the MLP
        if c.text_dim:
            self.norm_c, self.cross = (
                nn.LayerNorm(c.n_embd, eps=1e-6),
                CrossAttention(c.n_embd, c.n_head),
            )

    def forward(self, x, cond, ctx=None, ctx_mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        if ctx is not None:
            x = x + self.cross(self.norm_c(x), ctx, ctx_mask)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class DiT(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        assert c.input_size % c.patch_size == 0, (
            f"input_size {c.input_size} is not a multiple of patch_size {c.patch_size}"
        )
        assert c.n_embd % c.n_head == 0 and c.n_embd % 4 == 0, (
            "n_embd must divide by n_head and by 4"
        )
        self.grid = c.input_size // c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, c.n_embd, c.patch_size, stride=c.patch_size)
        self.register_buffer(
            'pos_embed', sincos_pos_embed(c.n_embd, self.grid)[None], persistent=False
        )
        self.t_embed = nn.Sequential(
            nn.Linear(256, c.n_embd), nn.SiLU(), nn.Linear(c.n_embd, c.n_embd)
        )
        # +1: the null class used for CFG
        self.y_embed = nn.Embedding(c.num_classes + 1, c.n_embd)
        # caption tokens -> model width once; the pooled caption joins the adaLN condition
        if c.text_dim:
            self.text = TextCond(c.text_dim, c.n_embd, c.n_embd)
        assert c.n_layer % c.share == 0, (
            f"n_layer {c.n_layer} must be a multiple of share {c.share}"
        )
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layer // c.share)])
        # recompute each block in backward: activation memory of one block
        self.grad_checkpoint = False
        self.norm_f = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=1e-6)
        self.adaLN_f = nn.Sequential(nn.SiLU(), nn.Linear(c.n_embd, 2 * c.n_embd))
        self.head = nn.Linear(c.n_embd, c.patch_size**2 * c.in_channels)
        self.init_weights()
        self.g_embed = guidance_embedding(c.n_embd) if c.guidance else None
        # PixArt-delta: trainable copies of the first blocks, each added back through a zero linear
        if c.hint_channels:
            n = c.control_blocks or max(1, c.n_layer // 2)
            assert n <= c.n_layer, f"control_blocks {n} is more than n_layer {c.n_layer}"
            self.control = nn.Module()
            self.control.hint = hint_encoder(c.hint_channels, c.n_embd, c.hint_size, self.grid)
            self.control.blocks = nn.ModuleList(
                copy.deepcopy(self.blocks[i // c.share]) for i in range(n)
            )
            self.control.zero = nn.ModuleList(
                zero_init(nn.Linear(c.n_embd, c.n_embd)) for _ in range(n)
            )

    def init_weights(self):
        c = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # initialise the patch projection like a linear layer
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: zero modulation and a zero output head, so the untrained model predicts 0
        # text starts neutral too
        zero = [b.cross.proj for b in self.blocks] + [self.text.pooled] if c.text_dim else []
        for mod in [b.adaLN[-1] for b in self.blocks] + [self.adaLN_f[-1], self.head] + zero:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def init_control_from_base(self):
        """Set the control branch's copies to the base blocks' current weights (after loading a base
        checkpoint)."""
        for i, block in enumerate(self.control.blocks):
            block.load_state_dict(self.blocks[i // self.config.share].state_dict())

    def forward(self, x, t, y, text=None, hint=None, control_scale=1.0, guidance=None):
        """x: [B, C, H, W] noisy input; t: [B] timestep on a 0..1000 scale; y: [B] class
        (num_classes = null); guidance: a guidance-distilled model's CFG scale [B] (None: 1, no
        guidance); text: None, or pre-encoded captions (states [B, L, text_dim], mask [B, L] bool,
        pooled [B, text_dim]); hint: None, or [B, hint_channels, hint_size, hint_size] in [0, 1] for
        the control branch, whose additions are multiplied by control_scale (a number, or [B]); no
        hint or a scale of 0 is exactly the base model."""
        c, p, g = self.config, self.config.patch_size, self.grid
        # [B, T, n_embd]
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        # fp32 here would make the whole residual stream fp32 under bf16 autocast
        h = h + self.pos_embed.to(h.dtype)
        cond = (
            self.t_embed(timestep_embedding(t, 256).to(h.dtype))
            + self.y_embed(y)
            + guidance_in(self, guidance, t, h.dtype)
        )
        ctx = mask = None
        if text is not None:
            ctx, mask, pooled = self.text(text)
            cond = cond + pooled
        on = control_on(self, hint, control_scale)
        # the branch's own stream starts from the same tokens plus the hint's
        if on:
            k = self.control
            hc = h + k.hint(hint).flatten(2).transpose(1, 2)
        for i in range(c.n_layer):
            h = run_block(self, self.blocks[i // c.share], h, cond, ctx, mask)
            # copy block i's output joins the base stream after base block i
            if on and i < len(k.blocks):
                hc = run_block(self, k.blocks[i], hc, cond, ctx, mask)
                h = h + scaled(k.zero[i](hc), control_scale)
        shift, scale = self.adaLN_f(cond).chunk(2, dim=1)
        # [B, T, p*p*C]
        h = self.head(modulate(self.norm_f(h), shift, scale))
        # unpatchify
        h = h.view(-1, g, g, p, p, c.in_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, c.in_channels, g * p, g * p)


# -----------------------------------------------------------------------------
# UNet: convolutions have the locality prior that a small pixel-space model on a CPU needs to learn
# in
# minutes; a DiT wins at scale on latents. Same interface as DiT: forward(x, t, y, text=None).


@dataclass
class UNetConfig:
    input_size: int = 32
    in_channels: int = 3
    # width of the first level
    channels: int = 64
    # one level per entry, each after the first at half the resolution
    channel_mult: tuple = (1, 2, 2)
    # ResBlocks per level (each way)
    num_res_blocks: int = 1
    # attention heads at the lowest resolution (and in the middle)
    n_head: int = 4
    num_classes: int = 0
    # > 0: caption tokens via cross-attention in the middle, pooled caption into emb
    text_dim: int = 0
    # > 0 adds a control branch (as DiTConfig)
    hint_channels: int = 0
    # the hint's side in pixels
    hint_size: int = 0
    # the CFG scale as an input (as DiTConfig)
    guidance: bool = False


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """Conv residual block; the condition sets a per-channel scale and shift after the second norm
    (ADM)."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        # start as the identity, like adaLN-Zero
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    def __init__(self, ch, n_head):
        super().__init__()
        self.n_head, self.norm = n_head, group_norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        # tokens [B, HW, 3C] with channels last in memory (free for a channels_last input), so q, k,
        # v have a unit
        # last stride: SDPA's fused kernels need it (else it falls back to the math kernel and its
        # HW x HW matrix)
        qkv = self.qkv(self.norm(x)).flatten(2).mT.contiguous()
        q, k, v = qkv.view(B, H * W, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # [B, heads, HW, C/heads]
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(B, H * W, C).mT.reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        chs = [c.channels * m for m in c.channel_mult]
        assert chs[-1] % c.n_head == 0, (
            f"the UNet's lowest level has {chs[-1]} channels: n_head={c.n_head} must divide it"
        )
        emb = 4 * c.channels
        self.t_embed = nn.Sequential(nn.Linear(256, emb), nn.SiLU(), nn.Linear(emb, emb))
        # +1: the null class used for CFG
        self.y_embed = nn.Embedding(c.num_classes + 1, emb)
        self.g_embed = guidance_embedding(emb) if c.guidance else None
        self.conv_in = nn.Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.down, self.up, skip_chs, ch = nn.ModuleList(), nn.ModuleList(), [], chs[0]
        for i, out in enumerate(chs):
            blocks = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, out, emb))
                ch = out
            down = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i < len(chs) - 1 else nn.Identity()
            self.down.append(nn.ModuleDict({'blocks': blocks, 'down': down}))
            skip_chs.append(ch)
        self.mid1, self.mid_attn, self.mid2 = (
            ResBlock(ch, ch, emb),
            SelfAttention2d(ch, c.n_head),
            ResBlock(ch, ch, emb),
        )
        # text at the lowest resolution, where attention is cheap; both start neutral (zero)
        if c.text_dim:
            self.text, self.norm_c, self.cross = (
                TextCond(c.text_dim, ch, emb),
                group_norm(ch),
                CrossAttention(ch, c.n_head),
            )
            for mod in (self.text.pooled, self.cross.proj):
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        for i, out in reversed(list(enumerate(chs))):
            blocks = nn.ModuleList()
            for j in range(c.num_res_blocks):
                # the skip joins first
                blocks.append(ResBlock(ch + (skip_chs[i] if j == 0 else 0), out, emb))
                ch = out
            up = nn.Identity()
            # to the next level's width before the conv at 2x resolution: half the FLOPs there
            if i > 0:
                up = nn.Sequential(
                    nn.Upsample(scale_factor=2, mode='nearest'),
                    nn.Conv2d(ch, chs[i - 1], 3, padding=1),
                )
                ch = chs[i - 1]
            self.up.append(nn.ModuleDict({'blocks': blocks, 'up': up}))
        self.norm_out, self.conv_out = group_norm(ch), nn.Conv2d(ch, c.in_channels, 3, padding=1)
        self.grad_checkpoint = False
        # the untrained model predicts 0
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # ControlNet: a trainable copy of the encoder and middle, added to the skips by zero convs
        if c.hint_channels:
            self.control = nn.Module()
            for name in self.copied():
                setattr(self.control, name, copy.deepcopy(getattr(self, name)))
            self.control.hint = hint_encoder(c.hint_channels, chs[0], c.hint_size, c.input_size)
            self.control.zero = nn.ModuleList(
                zero_init(nn.Conv2d(w, w, 1)) for w in skip_chs + chs[-1:]
            )

    def copied(self):
        """The base modules the control branch copies: the encoder and the middle, cross-attention
        included."""
        return ['conv_in', 'down', 'mid1', 'mid_attn', 'mid2'] + (
            ['norm_c', 'cross'] if self.config.text_dim else []
        )

    def init_control_from_base(self):
        """Set the control branch's copy to the base's current weights (after loading a base
        checkpoint)."""
        for name in self.copied():
            getattr(self.control, name).load_state_dict(getattr(self, name).state_dict())

    def encode(self, net, h, emb, ctx, mask):
        """conv_in's output -> (the middle's output, the skips), through net's encoder: the base's
        (net = self) or the control branch's copy (net = self.control)."""
        skips = []
        for level in net.down:
            for block in level['blocks']:
                h = run_block(self, block, h, emb)
            skips.append(h)
            h = level['down'](h)
        h = net.mid_attn(net.mid1(h, emb))
        if ctx is not None:
            B, C, H, W = h.shape
            # [B, HW, C]
            tokens = net.norm_c(h).flatten(2).transpose(1, 2)
            h = h + net.cross(tokens, ctx, mask).transpose(1, 2).reshape(B, C, H, W)
        return net.mid2(h, emb), skips

    def forward(self, x, t, y, text=None, hint=None, control_scale=1.0, guidance=None):
        """As DiT.forward; text = (states [B, L, text_dim], mask [B, L], pooled [B, text_dim]) or
        None."""
        emb = (
            self.t_embed(timestep_embedding(t, 256).to(x.dtype))
            + self.y_embed(y)
            + guidance_in(self, guidance, t, x.dtype)
        )
        ctx = mask = None
        if text is not None:
            ctx, mask, pooled = self.text(text)
            emb = emb + pooled
        h, skips = self.encode(self, self.conv_in(x), emb, ctx, mask)
        # the copy sees the hint after its conv_in; its features join ours
        if control_on(self, hint, control_scale):
            k = self.control
            hc, extra = self.encode(k, k.conv_in(x) + k.hint(hint), emb, ctx, mask)
            skips = [s + scaled(z(e), control_scale) for s, z, e in zip(skips, k.zero, extra)]
            h = h + scaled(k.zero[-1](hc), control_scale)
        for level in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in level['blocks']:
                h = run_block(self, block, h, emb)
            h = level['up'](h)
        return self.conv_out(F.silu(self.norm_out(h)))


# -----------------------------------------------------------------------------
# The control branch's shared parts. It starts with no effect (its links are zero) and trains with
# the base
# frozen, so the base model is never harmed and the branch's strength can be scaled at sampling.


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


def freeze_base(model):
    """Only the control branch trains (ControlNet locks the base): -> its parameters, for the
    optimizer."""
    model.requires_grad_(False)
    model.control.requires_grad_(True)
    return list(model.control.parameters())


def input_shape(meta):
    """The denoiser's input [C, H, W] for a prepare.py dataset: its VAE latents, or its pixels."""
    res = meta.get('resolution')
    return (
        tuple(meta['latent_shape'])
        if meta.get('kind') == 'latents'
        else (meta['channels'], res, res)
    )


def model_args_from(cfg, shape, num_classes, text_dim=0):
    """The model_args dict (what build_model takes and checkpoints store) from the config keys that
    train.py and bench.py share: arch, n_head, the DiT keys and the UNet keys."""
    args = dict(
        arch=cfg['arch'],
        input_size=shape[-1],
        in_channels=shape[0],
        num_classes=num_classes,
        n_head=cfg['n_head'],
    )
    if text_dim:
        args['text_dim'] = text_dim
    if cfg['arch'] == 'dit':
        args.update(
            patch_size=cfg['patch_size'],
            n_layer=cfg['n_layer'],
            n_embd=cfg['n_embd'],
            share=cfg['share_blocks'],
        )
    else:
        args.update(
            channels=cfg['unet_channels'],
            channel_mult=tuple(cfg['unet_mult']),
            num_res_blocks=cfg['unet_blocks'],
        )
    return args


def build_model(model_args):
    """A denoiser from the dict a checkpoint stores: {'arch': 'dit' | 'unet', ...the config
    fields}."""
    args = dict(model_args)
    arch = args.pop('arch')
    if arch not in ('dit', 'unet'):
        raise SystemExit(f"error: unknown arch {arch!r}: use 'dit' or 'unet'")
    try:
        return DiT(DiTConfig(**args)) if arch == 'dit' else UNet(UNetConfig(**args))
    # a shape that does not fit together: one line naming the keys
    except AssertionError as e:
        raise SystemExit(f"error: {e}") from None


# -----------------------------------------------------------------------------
# system: one definition of device and precision choice for train.py, sample.py and bench.py


def setup_device(device='auto', dtype='auto'):
    """-> (torch.device, torch dtype, autocast context). dtype 'auto': bf16 on GPUs that have it,
    fp16 on older GPUs (train.py adds a GradScaler), fp32 on CPU (CPU autocast is rarely faster for
    these models)."""
    try:
        dev = torch.device(
            ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
        )
    except RuntimeError:
        raise SystemExit(
            f"error: unknown device {device!r}: use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == 'cuda' and (dev.index or 0) >= torch.cuda.device_count():
        raise SystemExit(
            f"error: device {device!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s) here: use --device=cpu or auto"
        )
    if dtype == 'auto':
        dtype = (
            'float32'
            if dev.type != 'cuda'
            else 'bfloat16'
            if torch.cuda.is_bf16_supported()
            else 'float16'
        )
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype not in dtypes:
        raise SystemExit(f"error: dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
    ptdtype = dtypes[dtype]
    autocast = (
        nullcontext() if ptdtype == torch.float32 else torch.autocast(dev.type, dtype=ptdtype)
    )
    return dev, ptdtype, autocast
