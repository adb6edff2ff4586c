"""
REPA, representation alignment (Yu et al. 2024, "Representation Alignment for Generation: Training
Diffusion Transformers Is Easier Than You Think"): a training objective around the plain one. The
DiT's tokens after block repa_depth go through a small MLP (the projector, the model's `repa`
module) and are pulled, by cosine similarity, towards a frozen pretrained vision encoder's patch
features of the clean image:

    loss = plain denoising loss - repa_weight * mean over tokens of cos(projector(h), features)

The encoder is any transformers vision model, by hub id or folder (DINOv2, as the paper; CLIP's
vision tower, ViT, ...): the image is resized to the encoder's size and normalised as its
preprocessor says, and its patch tokens (the last (size / patch)^2 of its output, after any CLS and
register tokens) are resized, as a feature map, to the DiT's token grid. Pixel data is fed as it
is; latent data is decoded by the dataset's VAE first (every step: the cost is the VAE's decoder).
The projector is trained and saved with the model, and never used when sampling. Off (no
repa_encoder), nothing of it exists.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# the usual ImageNet statistics, for an encoder folder without a preprocessor config
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# encoders that are not transformers models, by name: (feature width, make(device) -> a callable
# like Encoder's); bench_repa.py adds its offline stand-in here
OTHER_ENCODERS = {}


def projector(width, hidden, out):
    """REPA's MLP from the DiT's width to the encoder's (three layers, SiLU between)."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out),
    )


def vision_config(name):
    """The encoder's config (its vision part for a CLIP-like model)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"error: --repa_encoder={name!r}: not a transformers model folder or hub id "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    return getattr(config, 'vision_config', config)


def encoder_width(name):
    """The width of the encoder's features: the projector's output (model_args' repa_dim)."""
    if name in OTHER_ENCODERS:
        return OTHER_ENCODERS[name][0]
    return vision_config(name).hidden_size


class Encoder:
    """A frozen vision encoder: images in [-1, 1] -> patch features [B, grid^2, D] on a grid^2
    token grid (the DiT's)."""

    def __init__(self, name, device):
        from transformers import AutoImageProcessor, AutoModel

        config = vision_config(name)
        model = AutoModel.from_pretrained(name)
        # CLIP-like: the vision tower alone
        self.model = getattr(model, 'vision_model', model).to(device).eval().requires_grad_(False)
        self.size, self.patch = config.image_size, config.patch_size
        try:
            proc = AutoImageProcessor.from_pretrained(name)
            mean, std = proc.image_mean, proc.image_std
        except (OSError, ValueError, AttributeError):
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images, grid):
        x = (images.float() + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode='bicubic', antialias=True)
        out = self.model(pixel_values=(x - self.mean) / self.std).last_hidden_state
        side = self.size // self.patch
        # the patch tokens are the last side^2 (after CLS and any registers)
        patches = out[:, -side * side :].float()
        fmap = patches.transpose(1, 2).reshape(len(x), -1, side, side)
        if side != grid:
            fmap = F.interpolate(fmap, size=(grid, grid), mode='bilinear', antialias=side > grid)
        return fmap.flatten(2).transpose(1, 2)


class Repa:
    """The objective: the plain one (inner, diffusion.Denoise) plus REPA's alignment term. The loop
    calls it as it calls any objective; everything but loss is the inner one's."""

    def __init__(self, inner, model, encoder, depth, weight, vae=None):
        self.inner, self.encoder, self.vae = inner, encoder, vae
        self.depth, self.weight = depth, weight
        self.raw = model
        self.grid = model.grid
        self.tokens = []
        # the tokens after block `depth` (counting a shared block's every use), as the model runs
        for block in dict.fromkeys(model.blocks):
            block.register_forward_hook(self.capture)

    def capture(self, module, args, output):
        self.tokens.append(output)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, batch, draws):
        self.tokens = []
        loss = self.inner.loss(model, batch, draws)
        h = self.tokens[self.depth - 1]
        images = batch.x0
        if self.vae is not None:
            with torch.no_grad():
                images = self.vae.decode(self.vae.from_latent(images.float()))
        target = self.encoder(images, self.grid)
        z = self.raw.repa(h)
        align = F.cosine_similarity(z.float(), target, dim=-1).mean()
        self.tokens = []
        return loss - self.weight * align


@functools.lru_cache(maxsize=1)
def _encoder(name, device):
    if name in OTHER_ENCODERS:
        return OTHER_ENCODERS[name][1](device)
    return Encoder(name, device)


def wrap(inner, model, cfg, vae, device):
    """train.py's objective with REPA around it (cfg: its settings)."""
    encoder = _encoder(cfg['repa_encoder'], str(device))
    return Repa(inner, model, encoder, cfg['repa_depth'], cfg['repa_weight'], vae)
