"""
Non-leaking augmentation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", EDM, appendix C.2: their "augment pipe"). Each training example gets random
transforms, each applied with its own probability, and the network is told what was applied: a
vector of the transforms' parameters, zero where a transform was not applied, given to it as extra
conditioning (model.py: aug_dim). The model learns the augmented images as such (a triangle rotated
by 30 degrees, knowing it is) and, sampled with the vector at zero, draws the clean distribution.
Without the vector (train.py --augment_cond=False: the control) the augmentation leaks: the model
draws rotated, hue-shifted images.

train.py's `augment` setting names the transforms, each with its probability and, optionally, its
strength (TRANSFORMS says what it means and its default):

    --augment=rotate:0.5,hue:0.5:1.0

The random numbers are drawn with the step's other draws (data.draw: a function of seed and step,
so resume stays exact) and everything is applied batched on the device: one grid_sample for every
geometric transform together (reflection padding, as EDM), one 3x3 colour matrix per example, masks
for erasing and GridMask; no per-image Python. Latent data takes integer translation (whole latent
pixels: a shifted latent decodes to the shifted image, away from the border) and additive noise
only; its x-flip is the stored mirror (prepare.py). Rotations, scaling and colour are not applied to
latents: resampled or recoloured VAE latents are not the latents of any image.
"""

import math

import torch
import torch.nn.functional as F

# name: (what strength means, its default as EDM or the paper it comes from has it, labels)
TRANSFORMS = {
    # geometric
    'xflip': ('unused', 1.0, 1),
    'rotate90': ('unused: a quarter, half or three-quarter turn', 1.0, 2),
    'translate': ('the largest shift, a fraction of the side (integer pixels)', 0.125, 2),
    'scale': ('the std of log2 of the isotropic scale', 0.2, 1),
    'rotate': ('the largest angle, a fraction of a half turn (1: any)', 1.0, 2),
    'aniso': ('the std of log2 of the x scale (y: its inverse)', 0.2, 1),
    # colour (pixel data)
    'brightness': ('the std of the offset added', 0.2, 1),
    'contrast': ('the std of log2 of the factor about mid-grey', 0.5, 1),
    'saturation': ('the std of log2 of the factor about the grey axis', 1.0, 1),
    'hue': ('the largest rotation about the grey axis, a fraction of a half turn', 1.0, 2),
    # occlusion and noise
    'erase': ('the largest side of the erased rectangle, a fraction of the image side', 0.5, 4),
    'gridmask': ('the share of each grid period that is masked (DeVries-style squares)', 0.5, 3),
    'noise': ('the largest std of the Gaussian noise added', 0.1, 1),
}
GEOMETRIC = ('xflip', 'rotate90', 'translate', 'scale', 'rotate', 'aniso')
COLOUR = ('brightness', 'contrast', 'saturation', 'hue')
# what latent data may take (see the docstring)
LATENT_OK = ('translate', 'noise')
# the conditioning vector: every transform's labels, in TRANSFORMS order, whether used or not
AUG_DIM = sum(n for _, _, n in TRANSFORMS.values())
OFFSET = {}
_at = 0
for _name, (_, _, _n) in TRANSFORMS.items():
    OFFSET[_name] = _at
    _at += _n


def parse(text, latent):
    """train.py's augment setting, 'name:probability[:strength],...' (strength: TRANSFORMS'
    default when left out), checked -> {name: (probability, strength)}. A bad entry is one line
    naming it."""
    spec = {}
    for item in filter(None, (part.strip() for part in text.split(','))):
        name, *numbers = item.split(':')
        if name not in TRANSFORMS:
            raise SystemExit(
                f"error: --augment: unknown transform {name!r}: use {', '.join(TRANSFORMS)}"
            )
        try:
            p, s = (float(v) for v in numbers + [TRANSFORMS[name][1]] * (2 - len(numbers)))
        except ValueError:
            p = s = float('nan')
        if len(numbers) not in (1, 2) or not (0 <= p <= 1 and 0 <= s < math.inf):
            raise SystemExit(
                f"error: --augment: {item!r} must be {name}:probability[:strength], probability "
                "in [0, 1], strength >= 0"
            )
        if latent and name not in LATENT_OK:
            raise SystemExit(
                f"error: --augment: {name!r} is not meaningful for latent data (only "
                f"{', '.join(LATENT_OK)}; the x-flip is the stored mirror)"
            )
        if name == 'gridmask' and not s < 1:
            raise SystemExit("error: --augment: 'gridmask' strength must be < 1 (all masked)")
        spec[name] = (p, s)
    return spec


def draw(g, n, shape, spec, device):
    """The augmentation of each of n examples, from generator g (data.draw's, after its other
    draws): -> (labels [n, AUG_DIM], noise [n, *shape] or None). Transforms draw in TRANSFORMS
    order, only those in spec. labels is all that apply needs, and what the network is told: zero
    where a transform was not applied."""
    labels = torch.zeros(n, AUG_DIM, device=device)
    noise = None
    for name in TRANSFORMS:
        if name not in spec:
            continue
        p, s = spec[name]
        on = (torch.rand(n, generator=g, device=device) < p).float()
        u = torch.rand(n, 4, generator=g, device=device)
        z = torch.randn(n, 2, generator=g, device=device)
        value = labels_of(name, s, u, z, shape)
        labels[:, OFFSET[name] : OFFSET[name] + value.shape[1]] = value * on[:, None]
        if name == 'noise':
            noise = torch.randn((n,) + tuple(shape), generator=g, device=device)
    return labels, noise


def labels_of(name, s, u, z, shape):
    """One transform's labels for every example, as applied (before the applied/not mask), from
    its uniform u [n, 4] and normal z [n, 2] draws and strength s."""
    size = shape[-1]
    if name == 'xflip':
        return torch.ones_like(u[:, :1])
    if name in ('rotate90', 'rotate', 'hue'):
        quarter = (u[:, 0] * 3).floor() + 1
        angle = quarter * math.pi / 2 if name == 'rotate90' else (2 * u[:, 0] - 1) * math.pi * s
        return torch.stack([angle.cos() - 1, angle.sin()], 1)
    if name == 'translate':
        # whole pixels, as a fraction of the side
        return ((2 * u[:, :2] - 1) * s * size).round() / size
    # scale, aniso, contrast, saturation: log2 of the factor; brightness: the offset
    if name in ('scale', 'aniso', 'contrast', 'saturation', 'brightness'):
        return z[:, :1] * s
    if name == 'erase':
        # centre in [-1, 1], width and height as fractions of the side, each > 0
        return torch.cat([2 * u[:, :2] - 1, (0.1 + 0.9 * u[:, 2:]) * s], 1)
    if name == 'gridmask':
        # period a quarter to half the side; the grid's offset within a period
        return torch.stack([0.25 + 0.25 * u[:, 0], u[:, 1], u[:, 2]], 1)
    # noise: its std
    return u[:, :1] * s


def part(labels, name):
    return labels[:, OFFSET[name] : OFFSET[name] + TRANSFORMS[name][2]]


def geometric_matrix(labels):
    """The forward 2x3 affine map of each example's geometric transforms, in grid_sample's
    normalised coordinates, and which examples have any ([n] bool)."""
    flip = part(labels, 'xflip')[:, 0]
    c90, s90 = cos_sin(part(labels, 'rotate90'))
    c, s = cos_sin(part(labels, 'rotate'))
    shift = torch.eye(3, device=labels.device).repeat(labels.shape[0], 1, 1)
    # [-1, 1] coordinates: a shift of a fraction f of the side is 2f
    shift[:, :2, 2] = 2 * part(labels, 'translate')
    scale = part(labels, 'scale')[:, 0].exp2()
    aniso = part(labels, 'aniso')[:, 0].exp2()
    # in this order: flip, quarter turns, rotation, shift, scale, anisotropic scale
    m = diag(1 - 2 * flip, torch.ones_like(flip))
    for a in (rotation(c90, s90), rotation(c, s), shift, diag(scale, scale)):
        m = a @ m
    m = diag(aniso, 1 / aniso) @ m
    used = labels[:, : sum(TRANSFORMS[k][2] for k in GEOMETRIC)].ne(0).any(1)
    return m, used


def cos_sin(label):
    """(cos, sin) of an angle from its labels (cos - 1, sin): zero labels are no turn."""
    return label[:, 0] + 1, label[:, 1]


def diag(a, b):
    m = torch.zeros(a.shape[0], 3, 3, device=a.device)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = a, b, 1
    return m


def rotation(c, s):
    m = torch.zeros(c.shape[0], 3, 3, device=c.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = c, -s, s, c, 1
    return m


def warp(x, labels):
    """Every geometric transform at once: x sampled at the inverse map of each example's, with
    reflection padding; examples with none are returned untouched (bit for bit)."""
    m, used = geometric_matrix(labels)
    if not used.any():
        return x
    inverse = torch.linalg.inv(m[used])[:, :2]
    grid = F.affine_grid(inverse, list(x[used].shape), align_corners=False)
    out = x.clone()
    out[used] = F.grid_sample(
        x[used].float(), grid, mode='bilinear', padding_mode='reflection', align_corners=False
    ).to(x.dtype)
    return out


def colour_matrix(labels):
    """Each example's 4x4 colour transform of RGB in [-1, 1] (homogeneous): brightness, contrast
    about mid-grey, then saturation and hue about the grey axis (1, 1, 1), as EDM turns them."""
    n, dev = labels.shape[0], labels.device
    m = torch.eye(4, device=dev).repeat(n, 1, 1)
    b = part(labels, 'brightness')[:, 0]
    m[:, :3, 3] += b[:, None]
    c = part(labels, 'contrast')[:, 0].exp2()
    m = diag4(c) @ m
    axis = torch.ones(3, device=dev) / math.sqrt(3)
    grey = torch.outer(axis, axis)
    # saturation: scale the part of each colour off the grey axis
    sat = part(labels, 'saturation')[:, 0].exp2()
    mix = grey + sat.view(-1, 1, 1) * (torch.eye(3, device=dev) - grey)
    m = block(mix) @ m
    # hue: rotate about the grey axis (Rodrigues' formula)
    cos, sin = cos_sin(part(labels, 'hue'))
    k = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev) / math.sqrt(3)
    rot = cos.view(-1, 1, 1) * torch.eye(3, device=dev) + sin.view(-1, 1, 1) * k
    rot = rot + (1 - cos).view(-1, 1, 1) * grey
    return block(rot) @ m


def diag4(c):
    m = torch.eye(4, device=c.device).repeat(c.shape[0], 1, 1)
    m[:, 0, 0] = m[:, 1, 1] = m[:, 2, 2] = c
    return m


def block(a):
    m = torch.eye(4, device=a.device).repeat(a.shape[0], 1, 1)
    m[:, :3, :3] = a
    return m


def recolour(x, labels):
    """The colour transforms, one matrix per example; examples with none untouched."""
    used = labels[:, OFFSET['brightness'] : OFFSET['erase']].ne(0).any(1)
    if not used.any():
        return x
    m = colour_matrix(labels[used])
    rgb = x[used].float()
    out = x.clone()
    out[used] = (torch.einsum('nij,njhw->nihw', m[:, :3, :3], rgb) + m[:, :3, 3, None, None]).to(
        x.dtype
    )
    return out


def occlude(x, labels, ratio):
    """Erasing (a rectangle set to mid-grey, 0) and GridMask (a square of side `ratio` x period in
    each grid period, Chen et al. 2020), as masks over every example at once."""
    n, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=x.device) + 0.5) / w * 2 - 1
    cx, cy, ew, eh = part(labels, 'erase').unbind(1)
    inside = ((xs[None, None, :] - cx.view(-1, 1, 1)).abs() < ew.view(-1, 1, 1)) & (
        (ys[None, :, None] - cy.view(-1, 1, 1)).abs() < eh.view(-1, 1, 1)
    )
    period, ox, oy = part(labels, 'gridmask').unbind(1)
    # period as a fraction of the side -> in the [-1, 1] coordinates (side 2)
    p = (2 * period).clamp_min(1e-6).view(-1, 1, 1)
    gx = ((xs[None, None, :] + 1) / p - ox.view(-1, 1, 1)).remainder(1) < ratio
    gy = ((ys[None, :, None] + 1) / p - oy.view(-1, 1, 1)).remainder(1) < ratio
    grid = gx & gy & (period > 0).view(-1, 1, 1)
    keep = ~(inside | grid)
    return x * keep[:, None].to(x.dtype)


def apply(x, labels, noise, spec):
    """x [n, C, H, W] (pixels in [-1, 1], or latents) augmented as labels says (draw): geometric,
    then colour, then occlusion, then noise, as the network is told. spec: for GridMask's ratio."""
    x = warp(x, labels)
    if x.shape[1] == 3 and any(k in spec for k in COLOUR):
        x = recolour(x, labels)
    if 'erase' in spec or 'gridmask' in spec:
        x = occlude(x, labels, spec.get('gridmask', (0, 0))[1])
    if noise is not None:
        x = x + part(labels, 'noise').view(-1, 1, 1, 1) * noise
    return x
