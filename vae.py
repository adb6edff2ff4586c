"""
The Stable Diffusion VAE (AutoencoderKL, Rombach et al. 2022) in one file, loading diffusers weights
as they are: our state-dict keys are exactly diffusers' AutoencoderKL keys, and tests/test_vae.py
checks encode/decode against diffusers itself (which is never imported here).

    # sd-vae-ft-mse round trip, prints PSNR
    python vae.py --image=in.png
    python vae.py --image=in.png --vae=black-forest-labs/FLUX.1-schnell --subfolder=vae --out=rt.png

    # or a local folder / .safetensors file
    vae = AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-mse')
    # x in [-1, 1]; z is what the diffusion model sees
    z = vae.to_latent(*vae.encode(x))
    x = vae.decode(vae.from_latent(z))

Latent scaling, z = (latent - shift_factor) * scaling_factor, so that z has about unit variance
(config.json carries both; a single-file checkpoint gets SD's unless told):
  SD 1.x, sd-vae-ft-mse  0.18215
  SDXL                   0.13025 (NaNs in fp16: run it fp32 or bf16)
  SD3                    1.5305, shift 0.0609  } 16 latent channels, no (post_)quant_conv
  FLUX                   0.3611, shift 0.1159  }
Also loads the two older layouts: diffusers' old attention names (query/key/value/proj_attn) and
original LDM/CompVis checkpoints (first_stage_model.encoder.down.0.block.0...), see
load_state_dict_any in vae_weights.py, which reads the weight files.
"""

import json
import math
import os
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vae_weights import hub_file, infer_config, load_state_dict_any, local_file, read_weights

# -----------------------------------------------------------------------------
# input image for the round trip (required)
image = ''
# hub id, diffusers folder, or single .safetensors/.ckpt file
vae = 'stabilityai/sd-vae-ft-mse'
# e.g. 'vae' inside a pipeline repo
subfolder = ''
out = 'roundtrip.png'
device = 'auto'
# 'float32', 'bfloat16' or 'float16' (not for the SDXL VAE)
dtype = 'float32'
# -----------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """The diffusers config.json keys that matter; defaults are Stable Diffusion's VAE."""

    in_channels: int = 3
    out_channels: int = 3
    # one per resolution level; each level but the last halves H, W
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    # training image size; also the tile size for tiled encode/decode
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    # FLUX / SD3 drop the 1x1 convs around the latent
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # diffusers' hint that the VAE misbehaves in fp16
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, d, where='config'):
        d = dict(d)
        if d.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
            raise SystemExit(f"error: {where} is a {d['_class_name']}, not an AutoencoderKL")
        n = len(d.get('block_out_channels', cls.block_out_channels))
        for key, want in (
            ('down_block_types', 'DownEncoderBlock2D'),
            ('up_block_types', 'UpDecoderBlock2D'),
        ):
            types = d.get(key, [want] * n)
            if len(types) != n or any(t != want for t in types):
                raise SystemExit(
                    f"error: {where}: {key} must be {n} x '{want}' (one per block_out_channels), "
                    f"got {types}"
                )
        if d.get('act_fn', 'silu') != 'silu':
            raise SystemExit(
                f"error: {where}: act_fn {d['act_fn']!r} is not supported, only 'silu'"
            )
        if isinstance(d.get('sample_size'), (list, tuple)):
            # diffusers tiles with the first entry too
            d['sample_size'] = d['sample_size'][0]
        if d.get('shift_factor') is None:
            d['shift_factor'] = 0.0
        known = {f.name for f in fields(cls)}
        # unknown keys (act_fn, _diffusers_version...) ignored
        c = cls(**{k: v for k, v in d.items() if k in known})
        c.block_out_channels = tuple(c.block_out_channels)
        return c


# -----------------------------------------------------------------------------
# modules; attribute names are diffusers' so that state-dict keys match


def group_norm(c, groups):
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual (only in the
    8x-downsampled mid block)."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = group_norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        # a list only so that the key is to_out.0
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)
        # [B, 1 head, HW, C]
        q, k, v = (lin(h).unsqueeze(1) for lin in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        # LDM pads right/bottom only, so H, W must be even
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class Block(nn.Module):
    """One resolution level: resnets, then an optional 2x down- or upsampler (diffusers'
    Down/UpDecoderBlock2D)."""

    def __init__(self, cin, cout, n, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)]
        )
        name = {Downsample: 'downsamplers', Upsample: 'upsamplers'}.get(resample)
        if name:
            setattr(self, name, nn.ModuleList([resample(cout)]))
        self.resample = name

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return getattr(self, self.resample)[0](x) if self.resample else x


class MidBlock(nn.Module):
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                Block(
                    ch[max(i - 1, 0)],
                    ch[i],
                    c.layers_per_block,
                    g,
                    Downsample if i < n - 1 else None,
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], g)
        # mean and logvar
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        # lowest resolution first
        ch, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                Block(
                    ch[max(i - 1, 0)],
                    ch[i],
                    c.layers_per_block + 1,
                    g,
                    Upsample if i < n - 1 else None,
                )
                for i in range(n)
            ]
        )
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior q(z|x). Unpacks as (mean, std), so `vae.to_latent(*vae.encode(x))` works."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        # as LDM: keeps exp() finite for untrained / extreme inputs
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        return self.mean + self.std * randn_like(self.mean, generator)

    def __iter__(self):
        return iter((self.mean, self.std))


def randn_like(x, generator=None):
    """Noise drawn on the generator's device (so a CPU generator gives the same numbers on any
    device)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def blend(a, b, n, dim):
    """Crossfade the first n rows (dim=2) or columns (dim=3) of b in from the last n of a, in place:
    diffusers' blend_v / blend_h, vectorised. Weights in float64 then cast, as diffusers'
    python-float weights are."""
    n = min(a.shape[dim], b.shape[dim], n)
    if n > 0:
        w = (torch.arange(n, dtype=torch.float64, device=b.device) / n).view([-1] + [1] * (3 - dim))
        head = b.narrow(dim, 0, n)
        head.copy_(a.narrow(dim, a.shape[dim] - n, n) * (1 - w).to(b.dtype) + head * w.to(b.dtype))
    return b


class AutoencoderKL(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        c = self.config = (
            config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config or {})
        )
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quant_conv = (
            nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        )
        self.post_quant_conv = (
            nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        )
        # tiling, with diffusers' attribute names and defaults (tests set them on both to compare)
        self.tile_sample_min_size = c.sample_size
        self.tile_latent_min_size = int(c.sample_size / 2 ** (len(c.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    def _encode(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z):
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def encode(self, x, tiled=None):
        """x [B, C, H, W] in [-1, 1] -> DiagonalGaussian over latents [B, latent_channels, H/8, W/8]
        (SD). tiled=None tiles when H or W exceeds tile_sample_min_size, so that memory stays
        bounded."""
        if tiled or (tiled is None and max(x.shape[-2:]) > self.tile_sample_min_size):
            return DiagonalGaussian(
                self.tiled(x, self._encode, self.tile_sample_min_size, self.tile_latent_min_size)
            )
        return DiagonalGaussian(self._encode(x))

    def decode(self, z, tiled=None):
        """Unscaled latents (see from_latent) -> images in about [-1, 1]."""
        if tiled or (tiled is None and max(z.shape[-2:]) > self.tile_latent_min_size):
            return self.tiled(z, self._decode, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode(z)

    def forward(self, x, tiled=None):
        return self.decode(self.encode(x, tiled).mean, tiled)

    def tiled(self, x, fn, tile, tile_out):
        """diffusers' tiled_encode / tiled_decode: fn on overlapping tile x tile windows (stride
        tile*(1-overlap)), each output tile crossfaded into its upper and left neighbours over `n`
        pixels, then its top-left `keep` square kept. Same order of in-place blends as diffusers, so
        the same numbers; but a row at a time, so only two rows of output tiles are alive. Each tile
        has its own GroupNorm statistics and attends only within itself, so the result differs
        slightly from untiled, most at the seams."""
        stride, n = (
            int(tile * (1 - self.tile_overlap_factor)),
            int(tile_out * self.tile_overlap_factor),
        )
        keep = tile_out - n
        prev, rows = None, []
        for i in range(0, x.shape[2], stride):
            row = []
            for j in range(0, x.shape[3], stride):
                t = fn(x[:, :, i : i + tile, j : j + tile])
                if prev is not None:
                    blend(prev[len(row)], t, n, dim=2)
                if row:
                    blend(row[-1], t, n, dim=3)
                row.append(t)
            rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
            prev = row
        return torch.cat(rows, dim=2)

    def to_latent(self, mean, std=None, generator=None):
        """Posterior mean (or a sample, given std) -> the normalised latent the diffusion model is
        trained on."""
        z = mean if std is None else mean + std * randn_like(mean, generator)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latent(self, z):
        return z / self.config.scaling_factor + self.config.shift_factor

    @classmethod
    def from_pretrained(cls, path, subfolder=None, config=None):
        """A diffusers folder or hub id (config.json + diffusion_pytorch_model.safetensors or .bin),
        or one .safetensors/.ckpt/.pt/.bin file in any layout load_state_dict_any knows; the
        architecture of a single file is read off its weight shapes, the rest (scaling_factor, ...)
        is SD's unless `config` overrides."""
        path = str(path)
        if os.path.isfile(path):
            sd = load_state_dict_any(read_weights(path))
            try:
                c = VAEConfig.from_dict({**infer_config(sd), **(config or {})}, path)
            except (KeyError, ValueError) as e:
                raise SystemExit(
                    f"error: {path} has no AutoencoderKL weights ({type(e).__name__} {e}); "
                    f"is it a VAE checkpoint?"
                )
            return cls(c).load_weights(sd, path)
        if not os.path.isdir(path) and (
            path.startswith(('/', '.', '~'))
            or path.endswith(('.safetensors', '.ckpt', '.pt', '.bin'))
        ):
            # a local path, not a hub id
            raise SystemExit(f"error: no such file or folder: {path}")
        folder = os.path.join(path, subfolder or '')
        fetch = (
            (lambda name: local_file(folder, name))
            if os.path.isdir(path)
            else (lambda name: hub_file(path, subfolder, name))
        )
        cfg_path = fetch('config.json')
        if cfg_path is None:
            hint = (
                " (a pipeline folder? pass subfolder='vae')"
                if os.path.exists(os.path.join(folder, 'model_index.json'))
                else ''
            )
            raise SystemExit(
                f"error: no config.json in {folder}{hint}; "
                f"need a diffusers AutoencoderKL folder or hub id"
            )
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {cfg_path}: {e}")
        weights = fetch('diffusion_pytorch_model.safetensors') or fetch(
            'diffusion_pytorch_model.bin'
        )
        if weights is None:
            raise SystemExit(
                f"error: no diffusion_pytorch_model.safetensors or .bin next to {cfg_path}"
            )
        c = VAEConfig.from_dict({**cfg, **(config or {})}, cfg_path)
        return cls(c).load_weights(load_state_dict_any(read_weights(weights)), weights)

    def load_weights(self, sd, where='state dict'):
        """Strict load of diffusers-keyed weights, with a one-line error on any mismatch."""
        own = self.state_dict()
        missing, extra = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
        shape = [k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape]
        if missing or extra or shape:
            raise SystemExit(
                f"error: weights in {where} do not fit the config: "
                f"{len(missing)} missing {missing[:3]}, "
                f"{len(extra)} unexpected {extra[:3]}, {len(shape)} of other shape {shape[:3]}; "
                f"check block_out_channels/layers_per_block/latent_channels/use_quant_conv "
                f"in config.json"
            )
        self.load_state_dict(sd, strict=True)
        return self.eval()


# -----------------------------------------------------------------------------
# the round trip


def psnr(a, b):
    """PSNR in dB of two uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float('inf') if mse == 0 else 10 * math.log10(255**2 / mse)


def main():
    from PIL import Image

    if not image:
        raise SystemExit("error: pass --image=path/to/image.png")
    try:
        img = Image.open(image).convert('RGB')
    except OSError as e:
        raise SystemExit(f"error: cannot read image {image}: {e}")
    dev = torch.device(
        ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    )
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(
        dtype
    )
    if ptdtype is None:
        raise SystemExit(f"error: dtype must be float32, bfloat16 or float16; got {dtype!r}")
    model = AutoencoderKL.from_pretrained(vae, subfolder=subfolder or None).to(dev, ptdtype)
    # H, W must be multiples of the downsampling factor
    f = 2 ** (len(model.config.block_out_channels) - 1)
    w, h = img.width // f * f, img.height // f * f
    if (w, h) != img.size:
        print(f"cropping {img.width}x{img.height} to {w}x{h} (multiples of {f})")
        img = img.crop((0, 0, w, h))
    a = np.array(img)
    x = (torch.from_numpy(a).permute(2, 0, 1)[None].to(dev).float() / 127.5 - 1).to(ptdtype)
    t0 = time.time()
    with torch.inference_mode():
        z = model.to_latent(model.encode(x).mean)
        y = model.decode(model.from_latent(z))
    if dev.type == 'cuda':
        torch.cuda.synchronize()
    dt = time.time() - t0
    b = ((y[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(b).save(out)
    print(f"latent {tuple(z.shape)} std {z.float().std():.3f}, {w}x{h} in {dt:.2f}s on {dev}")
    print(f"psnr: {psnr(a, b):.2f} dB -> {out}")


if __name__ == '__main__':
    from configurator import configure

    configure(globals())
    main()
