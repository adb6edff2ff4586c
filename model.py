"""
The denoisers (a DiT here, and a small UNet in unet.py), built from the dict a checkpoint stores,
and the device/precision choice. The layers both share are in layers.py; the diffusion math and the
samplers are in diffusion.py.

References:
- DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023), facebookresearch/DiT.
- UNet: Ronneberger et al. (2015), in the ADM form of Dhariwal & Nichol (2021).
- Control branch: Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models"
  (ControlNet, 2023) for the UNet; Chen et al., "PixArt-delta" (2024), section 3, for the DiT.
"""

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from augment import AUG_DIM
from repa import encoder_width, projector
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
from unet import UNet, UNetConfig

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
    # > 0: told what augmentation was applied (augment.py's labels, zero when sampling)
    aug_dim: int = 0
    # > 0: REPA's projector (repa.py) to an encoder of this width: trained, saved, never sampled
    repa_dim: int = 0
    repa_hidden: int = 2048
    # public checkpoints (dit_weights.py) as they were trained: the output's second half is a
    # learned variance (the official DiTs'; samplers use the first half only),
    learn_sigma: bool = False
    # the timestep frequencies 10000^(-k / (128 - freq_shift)): 0 the paper's, 1 diffusers' DiT,
    freq_shift: int = 0
    # and the MLP's LayerNorm epsilon (the paper's 1e-6; diffusers' DiT: its norm_eps)
    mlp_norm_eps: float = 1e-6


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


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


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the condition sets per-channel shift/scale/gate of each
    branch, and the gates start at zero so every block starts as the identity (DiT section 3.2)."""

    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=c.mlp_norm_eps)
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
        self.out_channels = c.in_channels * (2 if c.learn_sigma else 1)
        self.head = nn.Linear(c.n_embd, c.patch_size**2 * self.out_channels)
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
        # last, so that a model without it is initialised as before; no bias: all-zero labels
        # (nothing applied) are exactly no input, as when sampling; the default init, as EDM's
        # map_augment (zero-initialised, it was barely used after 1,200 steps: RESULTS.md)
        self.a_embed = nn.Linear(c.aug_dim, c.n_embd, bias=False) if c.aug_dim else None
        self.repa = projector(c.n_embd, c.repa_hidden, c.repa_dim) if c.repa_dim else None

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

    def forward(self, x, t, y, text=None, hint=None, control_scale=1.0, guidance=None, aug=None):
        """x: [B, C, H, W] noisy input; t: [B] timestep on a 0..1000 scale; y: [B] class
        (num_classes = null); guidance: a guidance-distilled model's CFG scale [B] (None: 1, no
        guidance); aug: [B, aug_dim] the augmentation applied (None: none, as when sampling); text:
        None, or pre-encoded captions (states [B, L, text_dim], mask [B, L] bool, pooled [B,
        text_dim]); hint: None, or [B, hint_channels, hint_size, hint_size] in [0, 1] for the
        control branch, whose additions are multiplied by control_scale (a number, or [B]); no hint
        or a scale of 0 is exactly the base model. -> [B, C, H, W] (learn_sigma: [B, 2C, H, W], the
        prediction's channels, then the variance's)."""
        c, p, g = self.config, self.config.patch_size, self.grid
        # [B, T, n_embd]
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        # fp32 here would make the whole residual stream fp32 under bf16 autocast
        h = h + self.pos_embed.to(h.dtype)
        cond = (
            self.t_embed(timestep_embedding(t, 256, shift=c.freq_shift).to(h.dtype))
            + self.y_embed(y)
            + guidance_in(self, guidance, t, h.dtype)
            + augment_in(self, aug, h.dtype)
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
        h = h.view(-1, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, self.out_channels, g * p, g * p)


# -----------------------------------------------------------------------------
# a denoiser from the settings or a checkpoint's model_args


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
    train.py and bench.py share: arch, n_head, the DiT keys and the UNet keys. A UNet gets the most
    heads <= n_head that divide its attention width (any UNet builds with the DiT's n_head=6)."""
    args = dict(
        arch=cfg['arch'],
        input_size=shape[-1],
        in_channels=shape[0],
        num_classes=num_classes,
        n_head=cfg['n_head'],
    )
    if text_dim:
        args['text_dim'] = text_dim
    # told what augmentation was applied (augment.py); without it (the leak control) it is not
    if cfg.get('augment') and cfg.get('augment_cond', True):
        args['aug_dim'] = AUG_DIM
    # REPA's projector, to the encoder's width
    if cfg.get('repa_encoder'):
        args.update(repa_dim=encoder_width(cfg['repa_encoder']), repa_hidden=cfg['repa_hidden'])
    # diffusers' DiT frequencies (only when asked: default model_args stay as they were)
    if cfg.get('freq_shift'):
        args['freq_shift'] = cfg['freq_shift']
    if cfg['arch'] == 'dit':
        args.update(
            patch_size=cfg['patch_size'],
            n_layer=cfg['n_layer'],
            n_embd=cfg['n_embd'],
            share=cfg['share_blocks'],
        )
    else:
        mult = tuple(cfg['unet_mult'])
        args.update(
            channels=cfg['unet_channels'], channel_mult=mult, num_res_blocks=cfg['unet_blocks']
        )
        # the UNet attends at its lowest level, `width` channels: its heads are the most <= n_head
        # that divide the width (the DiT's default n_head=6 gives a 128-wide level 4 heads)
        width = cfg['unet_channels'] * (mult[-1] if mult else 1)
        while args['n_head'] > 1 and width % args['n_head']:
            args['n_head'] -= 1
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


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): there bf16 autocast is faster
    than fp32; elsewhere it is emulated, and slower."""
    checks = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def setup_device(device='auto', dtype='auto', cpu_bf16=False):
    """-> (torch.device, torch dtype, autocast context). dtype 'auto': bf16 on GPUs that have it,
    fp16 on older GPUs (train.py adds a GradScaler), fp32 on CPU, or with cpu_bf16 bf16 on a CPU
    that computes it natively (cpu_has_bf16)."""
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
            f"error: device {device!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
            f"here: use --device=cpu or auto"
        )
    if dtype == 'auto' and dev.type == 'cpu':
        dtype = 'bfloat16' if cpu_bf16 and cpu_has_bf16() else 'float32'
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
