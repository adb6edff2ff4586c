"""
The denoiser (a DiT) and all of the diffusion math, in one place: train.py and sample.py import both.

References:
- DiT: Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023), facebookresearch/DiT.
- DDPM: Ho et al. (2020); cosine schedule: Nichol & Dhariwal, "Improved DDPM" (2021).
- v-prediction: Salimans & Ho, "Progressive Distillation" (2022).
- Rectified flow / flow matching: Liu et al. (2022), Lipman et al. (2022); logit-normal t: SD3, Esser et al. (2024).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
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
    input_size: int = 32     # side of the (pixel or latent) input
    in_channels: int = 3
    patch_size: int = 2
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 384
    mlp_ratio: float = 4.0
    num_classes: int = 0     # 0 = unconditional; index num_classes is the null ("no label") class for CFG
    share: int = 1           # each block's weights serve `share` consecutive layers (ALBERT-style): 1 = none
    text_dim: int = 0        # width of pre-encoded caption tokens; > 0 adds cross-attention to them (0 = no text)


def run_block(model, block, *args):
    """block(*args), or with gradient checkpointing: its activations are recomputed in backward instead of
    kept, trading ~30% more compute for memory (model.grad_checkpoint, set by train.py)."""
    if model.grad_checkpoint and model.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of a (float) timestep on a 0..1000 scale, as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(n_embd, grid):
    """Fixed 2-D sin-cos position embedding [grid*grid, n_embd] (MAE/DiT): half the channels per axis."""
    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing='ij')
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
        y = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernel where available
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padded caption positions are masked out."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.q, self.kv, self.proj = nn.Linear(n_embd, n_embd), nn.Linear(n_embd, 2 * n_embd), nn.Linear(n_embd, n_embd)

    def forward(self, x, ctx, mask):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # mask: True = a real token
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TextCond(nn.Module):
    """Pre-encoded captions -> (tokens at the attention width, their mask, the pooled caption at the condition
    width, added to the timestep embedding). Both the DiT and the UNet take text through this."""

    def __init__(self, text_dim, width, cond_dim):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, width), nn.GELU(approximate='tanh'), nn.Linear(width, width))
        self.pooled = nn.Linear(text_dim, cond_dim)

    def forward(self, text):
        states, mask, pooled = text
        return self.proj(states), mask, self.pooled(pooled)


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the condition sets per-channel shift/scale/gate of each branch,
    and the gates start at zero so every block starts as the identity (DiT section 3.2)."""

    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=1e-6)
        hidden = int(c.n_embd * c.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, hidden), nn.GELU(approximate='tanh'), nn.Linear(hidden, c.n_embd))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(c.n_embd, 6 * c.n_embd))
        if c.text_dim:  # PixArt-style: un-modulated cross-attention between self-attention and the MLP
            self.norm_c, self.cross = nn.LayerNorm(c.n_embd, eps=1e-6), CrossAttention(c.n_embd, c.n_head)

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
        assert c.input_size % c.patch_size == 0, f"input_size {c.input_size} is not a multiple of patch_size {c.patch_size}"
        assert c.n_embd % c.n_head == 0 and c.n_embd % 4 == 0, "n_embd must divide by n_head and by 4"
        self.grid = c.input_size // c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, c.n_embd, c.patch_size, stride=c.patch_size)
        self.register_buffer('pos_embed', sincos_pos_embed(c.n_embd, self.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, c.n_embd), nn.SiLU(), nn.Linear(c.n_embd, c.n_embd))
        self.y_embed = nn.Embedding(c.num_classes + 1, c.n_embd)  # +1: the null class used for CFG
        if c.text_dim:  # caption tokens -> model width once; the pooled caption joins the adaLN condition
            self.text = TextCond(c.text_dim, c.n_embd, c.n_embd)
        assert c.n_layer % c.share == 0, f"n_layer {c.n_layer} must be a multiple of share {c.share}"
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layer // c.share)])
        self.grad_checkpoint = False  # recompute each block in backward: activation memory of one block
        self.norm_f = nn.LayerNorm(c.n_embd, elementwise_affine=False, eps=1e-6)
        self.adaLN_f = nn.Sequential(nn.SiLU(), nn.Linear(c.n_embd, 2 * c.n_embd))
        self.head = nn.Linear(c.n_embd, c.patch_size ** 2 * c.in_channels)
        self.init_weights()

    def init_weights(self):
        c = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # initialise the patch projection like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: zero modulation and a zero output head, so the untrained model predicts 0
        zero = [b.cross.proj for b in self.blocks] + [self.text.pooled] if c.text_dim else []  # text starts neutral too
        for mod in [b.adaLN[-1] for b in self.blocks] + [self.adaLN_f[-1], self.head] + zero:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def forward(self, x, t, y, text=None):
        """x: [B, C, H, W] noisy input; t: [B] timestep on a 0..1000 scale; y: [B] class (num_classes = null);
        text: None, or pre-encoded captions (states [B, L, text_dim], mask [B, L] bool, pooled [B, text_dim])."""
        c, p, g = self.config, self.config.patch_size, self.grid
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, T, n_embd]
        cond = self.t_embed(timestep_embedding(t, 256).to(h.dtype)) + self.y_embed(y)
        ctx = mask = None
        if text is not None:
            ctx, mask, pooled = self.text(text)
            cond = cond + pooled
        for i in range(c.n_layer):
            h = run_block(self, self.blocks[i // c.share], h, cond, ctx, mask)
        shift, scale = self.adaLN_f(cond).chunk(2, dim=1)
        h = self.head(modulate(self.norm_f(h), shift, scale))  # [B, T, p*p*C]
        h = h.view(-1, g, g, p, p, c.in_channels).permute(0, 5, 1, 3, 2, 4)  # unpatchify
        return h.reshape(-1, c.in_channels, g * p, g * p)


# -----------------------------------------------------------------------------
# UNet: convolutions have the locality prior that a small pixel-space model on a CPU needs to learn in
# minutes; a DiT wins at scale on latents. Same interface as DiT: forward(x, t, y, text=None).

@dataclass
class UNetConfig:
    input_size: int = 32
    in_channels: int = 3
    channels: int = 64            # width of the first level
    channel_mult: tuple = (1, 2, 2)  # one level per entry, each after the first at half the resolution
    num_res_blocks: int = 1       # ResBlocks per level (each way)
    n_head: int = 4               # attention heads at the lowest resolution (and in the middle)
    num_classes: int = 0
    text_dim: int = 0             # > 0: caption tokens via cross-attention in the middle, pooled caption into emb


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """Conv residual block; the condition sets a per-channel scale and shift after the second norm (ADM)."""

    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # start as the identity, like adaLN-Zero
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
        q, k, v = self.qkv(self.norm(x)).view(B, 3, self.n_head, C // self.n_head, H * W).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        return x + self.proj(y.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        chs = [c.channels * m for m in c.channel_mult]
        assert chs[-1] % c.n_head == 0, f"the UNet's lowest level has {chs[-1]} channels: n_head={c.n_head} must divide it"
        emb = 4 * c.channels
        self.t_embed = nn.Sequential(nn.Linear(256, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.y_embed = nn.Embedding(c.num_classes + 1, emb)  # +1: the null class used for CFG
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
        self.mid1, self.mid_attn, self.mid2 = ResBlock(ch, ch, emb), SelfAttention2d(ch, c.n_head), ResBlock(ch, ch, emb)
        if c.text_dim:  # text at the lowest resolution, where attention is cheap; both start neutral (zero)
            self.text, self.norm_c, self.cross = TextCond(c.text_dim, ch, emb), group_norm(ch), CrossAttention(ch, c.n_head)
            for mod in (self.text.pooled, self.cross.proj):
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        for i, out in reversed(list(enumerate(chs))):
            blocks = nn.ModuleList()
            for j in range(c.num_res_blocks):
                blocks.append(ResBlock(ch + (skip_chs[i] if j == 0 else 0), out, emb))  # the skip joins first
                ch = out
            up = nn.Identity()
            if i > 0:  # to the next level's width before the conv at 2x resolution: half the FLOPs there
                up = nn.Sequential(nn.Upsample(scale_factor=2, mode='nearest'), nn.Conv2d(ch, chs[i - 1], 3, padding=1))
                ch = chs[i - 1]
            self.up.append(nn.ModuleDict({'blocks': blocks, 'up': up}))
        self.norm_out, self.conv_out = group_norm(ch), nn.Conv2d(ch, c.in_channels, 3, padding=1)
        self.grad_checkpoint = False
        nn.init.zeros_(self.conv_out.weight)  # the untrained model predicts 0
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y, text=None):
        """As DiT.forward; text = (states [B, L, text_dim], mask [B, L], pooled [B, text_dim]) or None."""
        emb = self.t_embed(timestep_embedding(t, 256).to(x.dtype)) + self.y_embed(y)
        if text is not None:
            ctx, mask, pooled = self.text(text)
            emb = emb + pooled
        h, skips = self.conv_in(x), []
        for level in self.down:
            for block in level['blocks']:
                h = run_block(self, block, h, emb)
            skips.append(h)
            h = level['down'](h)
        h = self.mid_attn(self.mid1(h, emb))
        if text is not None:
            B, C, H, W = h.shape
            tokens = self.norm_c(h).flatten(2).transpose(1, 2)  # [B, HW, C]
            h = h + self.cross(tokens, ctx, mask).transpose(1, 2).reshape(B, C, H, W)
        h = self.mid2(h, emb)
        for level in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in level['blocks']:
                h = run_block(self, block, h, emb)
            h = level['up'](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def input_shape(meta):
    """The denoiser's input [C, H, W] for a prepare.py dataset: its VAE latents, or its pixels."""
    res = meta.get('resolution')
    return tuple(meta['latent_shape']) if meta.get('kind') == 'latents' else (meta['channels'], res, res)


def model_args_from(cfg, shape, num_classes, text_dim=0):
    """The model_args dict (what build_model takes and checkpoints store) from the config keys that
    train.py and bench.py share: arch, n_head, the DiT keys and the UNet keys."""
    args = dict(arch=cfg['arch'], input_size=shape[-1], in_channels=shape[0], num_classes=num_classes, n_head=cfg['n_head'])
    if text_dim:
        args['text_dim'] = text_dim
    if cfg['arch'] == 'dit':
        args.update(patch_size=cfg['patch_size'], n_layer=cfg['n_layer'], n_embd=cfg['n_embd'], share=cfg['share_blocks'])
    else:
        args.update(channels=cfg['unet_channels'], channel_mult=tuple(cfg['unet_mult']), num_res_blocks=cfg['unet_blocks'])
    return args


def build_model(model_args):
    """A denoiser from the dict a checkpoint stores: {'arch': 'dit' | 'unet', ...the config fields}."""
    args = dict(model_args)
    arch = args.pop('arch')
    if arch not in ('dit', 'unet'):
        raise SystemExit(f"error: unknown arch {arch!r}: use 'dit' or 'unet'")
    try:
        return DiT(DiTConfig(**args)) if arch == 'dit' else UNet(UNetConfig(**args))
    except AssertionError as e:  # a shape that does not fit together: one line naming the keys
        raise SystemExit(f"error: {e}") from None


# -----------------------------------------------------------------------------
# Diffusion math: how x_t is made from data, what the network is trained to predict, how x0 is read
# back from its output. Every objective is written as x_t = alpha_t * x0 + sigma_t * noise, which is
# all a sampler needs (DPM-Solver++ works in log-SNR lambda = log(alpha / sigma)).

class Diffusion:
    def __init__(self, objective='flow', schedule='cosine', prediction='v', num_timesteps=1000):
        assert objective in ('flow', 'vp'), f"objective must be 'flow' or 'vp', got {objective!r}"
        assert prediction in ('eps', 'v', 'x0'), f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}"
        self.objective, self.schedule, self.prediction, self.T = objective, schedule, prediction, num_timesteps
        if objective == 'vp':
            self.alphas_cumprod = vp_alphas_cumprod(schedule, num_timesteps)

    def alpha_sigma(self, t):
        """Signal and noise scales at time t (a float64 tensor): flow t in [0, 1]; vp t in [0, T-1]."""
        if self.objective == 'flow':  # straight line from data (t=0) to noise (t=1)
            return 1 - t, t
        ac = self.alphas_cumprod.to(t.device)
        lo = t.floor().long().clamp(0, self.T - 1)  # linear interpolation between discrete steps
        a = ac[lo] + (t - lo) * (ac[(lo + 1).clamp(max=self.T - 1)] - ac[lo])
        return a.sqrt(), (1 - a).sqrt()

    def model_time(self, t):
        """The timestep value the network sees, on a 0..1000 scale for both objectives."""
        return t * 1000 if self.objective == 'flow' else t

    def sample_t(self, n, generator=None, device='cpu'):
        if self.objective == 'flow':  # logit-normal(0, 1): more weight on the middle times (SD3 sec. 3.1)
            return torch.sigmoid(torch.randn(n, generator=generator, device=device, dtype=torch.float64))
        return torch.randint(0, self.T, (n,), generator=generator, device=device).double()

    def loss(self, model, x0, y, t, noise, min_snr_gamma=0.0, text=None):
        """Mean squared error of the network's prediction; t and noise are drawn by the caller.
        min_snr_gamma > 0: Min-SNR-gamma weighting (Hang et al. 2023), see min_snr_weight.
        text: the captions' (states, mask, pooled) for a text-conditional model, else None."""
        alpha, sigma = (s.float().view(-1, 1, 1, 1) for s in self.alpha_sigma(t))
        x_t = alpha * x0 + sigma * noise
        out = model(x_t, self.model_time(t).float(), y, text)
        if self.objective == 'flow':
            target = noise - x0  # velocity dx_t/dt
        else:
            target = {'eps': noise, 'v': alpha * noise - sigma * x0, 'x0': x0}[self.prediction]
        if not min_snr_gamma:
            return F.mse_loss(out.float(), target)
        per_example = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (per_example * self.min_snr_weight(t, min_snr_gamma)).mean()

    def min_snr_weight(self, t, gamma):
        """Per-example weight so that the loss is min(SNR, gamma) * |x0 error|^2 whatever the network predicts:
        the error of each output type is k * (x0 error) with k^2 = SNR (eps), 1/sigma^2 (v, and flow's
        velocity: x0 = x_t - t v), 1 (x0); the weight is min(SNR, gamma) / k^2. High-SNR (nearly clean) steps
        stop dominating, which the paper shows speeds up convergence ~3x."""
        alpha, sigma = self.alpha_sigma(t)
        snr = (alpha / sigma) ** 2
        k2 = {'eps': snr, 'v': 1 / sigma ** 2, 'x0': torch.ones_like(snr)}['v' if self.objective == 'flow' else self.prediction]
        return (snr.clamp(max=gamma) / k2).float()

    def to_x0(self, out, x_t, alpha, sigma):
        """The data prediction implied by the network output (what DPM-Solver++ integrates)."""
        if self.objective == 'flow':
            return x_t - sigma * out  # x0 = x_t - t * v
        if self.prediction == 'eps':
            return (x_t - sigma * out) / alpha
        if self.prediction == 'v':
            return alpha * x_t - sigma * out
        return out

    def edm_sigma(self, t):
        """sigma/alpha, the noise level of x/alpha (EDM's sigma); +inf at pure noise."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_from_edm_sigma(self, s):
        """Inverse of edm_sigma. vp: alpha_bar = 1 / (1 + s^2), found on the same piecewise-linear alpha_bar(t)
        that alpha_sigma uses, so the round trip is exact."""
        if self.objective == 'flow':
            return s / (1 + s)
        ac = self.alphas_cumprod.flip(0).numpy()  # increasing, for np.interp
        t = np.interp((1 / (1 + s ** 2)).numpy(), ac, np.arange(self.T - 1, -1, -1, dtype=np.float64))
        return torch.from_numpy(t)

    def sampling_schedule(self, steps, spacing='linspace'):
        """Times for a `steps`-step sampler, from pure noise to clean data: the model is evaluated at
        t[0..steps-1]; alpha/sigma have steps+1 entries, the last one clean (alpha=1, sigma=0).
        spacing: 'linspace', 'leading', 'trailing': uniform in time, exactly as diffusers spaces them;
        'logsnr': uniform in log-SNR (DPM-Solver's choice); 'karras': EDM's rho=7 spacing of sigma/alpha.
        The last two span sigma/alpha from min(start, 80) to s_min (0.002, or the first training step), so the final step to
        clean data starts almost clean: a time-uniform grid's last step returns the posterior mean at a
        large noise level, which over-shrinks samples (towards the mean)."""
        T = self.T
        if spacing not in ('logsnr', 'karras', 'linspace', 'leading', 'trailing'):
            raise SystemExit(f"error: unknown spacing {spacing!r}: use linspace, leading, trailing, logsnr or karras")
        if spacing in ('logsnr', 'karras'):
            t_max = 1 - 1e-4 if self.objective == 'flow' else T - 1.0  # flow: t=1 has infinite sigma/alpha
            t_min = 0.002 / 1.002 if self.objective == 'flow' else 0.0
            s_max, s_min = self.edm_sigma(torch.tensor([t_max, t_min], dtype=torch.float64))
            s_max = s_max.clamp(max=80.0)  # EDM's sigma_max: above it no signal of [-1, 1] data is visible,
            # so grid points there are wasted; the first call stays at the true start, pure noise
            i = torch.linspace(0, 1, steps, dtype=torch.float64)
            if spacing == 'logsnr':
                s = (s_max.log() + i * (s_min.log() - s_max.log())).exp()
            else:
                rho = 7.0
                s = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            t = self.t_from_edm_sigma(s)
            t[0] = 1.0 if self.objective == 'flow' else t_max  # start from pure noise
        elif self.objective == 'flow':
            t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
        elif spacing == 'linspace':  # diffusers' DPMSolverMultistepScheduler default
            t = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
        elif spacing == 'leading':  # diffusers' DDIM/DDPM default
            t = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0)
        else:  # 'trailing': "Common Diffusion Noise Schedules and Sample Steps Are Flawed", table 2
            t = torch.from_numpy(np.round(np.arange(T, 0, -T / steps)) - 1).double()
        alpha, sigma = self.alpha_sigma(t)
        alpha = torch.cat([alpha, torch.ones(1, dtype=torch.float64)])
        sigma = torch.cat([sigma, torch.zeros(1, dtype=torch.float64)])
        return t, alpha, sigma


def vp_alphas_cumprod(schedule, T):
    """Cumulative signal fraction alpha_bar_t for discrete steps 0..T-1 (float64)."""
    if schedule == 'linear':  # DDPM: betas from 1e-4 to 0.02
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif schedule == 'cosine':  # iDDPM: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2), betas capped at 0.999
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}: use 'linear' or 'cosine'")
    return torch.cumprod(1 - betas, dim=0)


# -----------------------------------------------------------------------------
# system: one definition of device and precision choice for train.py, sample.py and bench.py

def setup_device(device='auto', dtype='auto'):
    """-> (torch.device, torch dtype, autocast context). dtype 'auto': bf16 on GPUs that have it, fp16 on
    older GPUs (train.py adds a GradScaler), fp32 on CPU (CPU autocast is rarely faster for these models)."""
    try:
        dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    except RuntimeError:
        raise SystemExit(f"error: unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == 'cuda' and (dev.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: device {device!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s) here: use --device=cpu or auto")
    if dtype == 'auto':
        dtype = 'float32' if dev.type != 'cuda' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype not in dtypes:
        raise SystemExit(f"error: dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
    ptdtype = dtypes[dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(dev.type, dtype=ptdtype)
    return dev, ptdtype, autocast
