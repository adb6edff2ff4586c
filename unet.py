"""
The small UNet denoiser: convolutions have the locality prior that a small pixel-space model on a
CPU needs to learn in minutes; a DiT (model.py) wins at scale on latents. Same interface as DiT:
forward(x, t, y, text=None, hint=None, control_scale=1.0, guidance=None).

Reference: Ronneberger et al. (2015), in the ADM form of Dhariwal & Nichol (2021); the control
branch is ControlNet's (Zhang et al. 2023).
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import (
    CrossAttention,
    TextCond,
    control_on,
    guidance_embedding,
    augment_in,
    guidance_in,
    hint_encoder,
    run_block,
    scaled,
    timestep_embedding,
    zero_init,
)


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
    # the augmentation labels as an input (as DiTConfig)
    aug_dim: int = 0


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
        # v have a unit last stride: SDPA's fused kernels need it (else it falls back to the math
        # kernel and its HW x HW matrix)
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
        # last, so that a model without it is initialised as before; no bias: all-zero labels
        # (nothing applied) are exactly no input, as when sampling; the default init, as EDM's
        # map_augment (zero-initialised, it was barely used after 1,200 steps: RESULTS.md)
        self.a_embed = nn.Linear(c.aug_dim, emb, bias=False) if c.aug_dim else None

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

    def forward(self, x, t, y, text=None, hint=None, control_scale=1.0, guidance=None, aug=None):
        """As DiT.forward; text = (states [B, L, text_dim], mask [B, L], pooled [B, text_dim]) or
        None."""
        emb = (
            self.t_embed(timestep_embedding(t, 256).to(x.dtype))
            + self.y_embed(y)
            + guidance_in(self, guidance, t, x.dtype)
            + augment_in(self, aug, x.dtype)
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
