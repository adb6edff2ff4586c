"""
Reading a dataset made by prepare.py: meta.json and the memory-mapped splits, each checked against
the other when opened (a torn or mismatched file is one line saying to re-run prepare.py); which
examples make up each training batch, and every random number of a step (`draw`), each a pure
function of the step so that resuming needs no data-loader or RNG state; and the `Batch` the
network is trained on (`Data.batch`: where a new conditioning or an augmentation goes).
"""

import functools
import json
import os
from dataclasses import dataclass, fields

import numpy as np
import torch

import augment

# what prepare.py and metrics.py read as images
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def bad_data(path, why):
    raise SystemExit(f"error: {path} {why}: re-run prepare.py to rebuild the dataset")


def read_meta(data_dir):
    """A prepare.py dataset's meta.json, checked."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise SystemExit(f"error: no dataset at {data_dir} ({path} missing): run prepare.py first")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        bad_data(path, f"is unreadable ({e})")
    if not isinstance(meta, dict):
        bad_data(path, "is not a JSON object")
    need = ('kind', 'num_classes', 'splits') + (
        ('latent_shape',) if meta.get('kind') == 'latents' else ('resolution', 'channels')
    )
    need += ('hint_shape',) if meta.get('hint') else ()
    if any(k not in meta for k in need):
        bad_data(path, f"lacks some of {', '.join(need)}")
    return meta


@dataclass
class Draws:
    """Every random number of one training step, for the whole global batch (see draw)."""

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor
    eps: torch.Tensor | None
    flip: torch.Tensor | None
    empty: torch.Tensor
    u: torch.Tensor
    aug: torch.Tensor | None = None
    aug_noise: torch.Tensor | None = None

    def part(self, s):
        """The draws of the examples in slice s (a process's micro-batch)."""
        values = [getattr(self, f.name) for f in fields(self)]
        return Draws(*(None if v is None else v[s] for v in values))


def draw(
    diffusion,
    step,
    n,
    shape,
    device,
    seed,
    latent=False,
    class_dropout=0.0,
    hint_dropout=0.0,
    flip_pixels=False,
    augment_spec=None,
):
    """Every random number of a step's global batch of n, from a generator seeded by (seed, step): a
    pure function of the step, so resuming needs no RNG state, and N processes slice the same draws
    as one. The order is fixed: a new kind of draw goes after the last one, so that every draw
    before it, and so every run before it, stays bit for bit as it was."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step)
    # each example's diffusion time and noise
    t = diffusion.sample_t(n, g, device)
    noise = torch.randn((n,) + shape, generator=g, device=device)
    # label dropout, for CFG: the null class (a text model: the empty caption)
    drop = torch.rand(n, generator=g, device=device) < class_dropout
    # latents: the VAE posterior's sample (mean + std * eps); whether the image is mirrored
    # (latents always; pixels with flip_pixels, in the same place: off, every run is as it was)
    eps = torch.randn((n,) + shape, generator=g, device=device) if latent else None
    flip = torch.rand(n, generator=g, device=device) < 0.5 if latent or flip_pixels else None
    # a control branch's hint dropout: an all-zero hint, so the branch's strength can be scaled
    empty = torch.rand(n, generator=g, device=device) < hint_dropout
    # distillation: each example's student step and CFG scale, in [0, 1)
    u = torch.rand(n, 2, generator=g, device=device, dtype=torch.float64)
    # augmentation (augment.py; augment_spec: augment.parse's): each example's transforms, as the
    # network is told them, and the noise the 'noise' transform adds
    aug, aug_noise = (
        augment.draw(g, n, shape, augment_spec, device) if augment_spec else (None,) * 2
    )
    return Draws(t, noise, drop, eps, flip, empty, u, aug, aug_noise)


@dataclass
class Batch:
    """What the network sees of a batch: clean images x0 [B, C, H, W], labels y [B] (the null class
    where dropped), the captions' (states, mask, pooled) or None, the hint maps or None."""

    x0: torch.Tensor
    y: torch.Tensor
    text: tuple | None
    hint: torch.Tensor | None
    # what augmentation was applied (augment.py's labels), where the network is told; else None
    aug: torch.Tensor | None = None


class Data:
    """A split of a prepare.py dataset, memory-mapped: a batch is one fancy-index and one
    host->device copy. Pixel data: uint8 [N, 3, H, W]. Latent data: fp16 [N, 2, 2, C, h, w] =
    (image, h-flipped) x (posterior mean, std) from the VAE, so every step can draw a fresh latent
    mean + std * eps of either orientation. Captions (text=True): the pre-encoded (states, mask,
    pooled) arrays, and those of the empty caption. Hints (when meta has one): uint8 [N, 1, H, W]
    control maps at the pixel resolution, also for latents."""

    def __init__(self, data_dir, split, device, text=False, resident=None):
        meta = read_meta(data_dir)
        # what batch() assembles: the null class a dropped label becomes; whether it carries the
        # hints (train.py sets it for a control run); the augmentation (augment.parse's spec) and
        # whether the batch tells the network what was applied (train.py sets both)
        self.null_class = meta['num_classes']
        self.hints = False
        self.augment, self.augment_cond = {}, True
        self.latent = meta['kind'] == 'latents'
        n, L, D = meta['splits'].get(split), meta.get('text_max_len'), meta.get('text_dim')
        x_shape = (
            (n, 2, 2, *meta['latent_shape'])
            if self.latent
            else (n, meta['channels'], meta['resolution'], meta['resolution'])
        )

        # every array checked against meta: a torn file is one line here
        def load(name, shape, mmap_mode='r'):
            path = os.path.join(data_dir, name + '.npy')
            try:
                a = np.load(path, mmap_mode=mmap_mode)
            except (OSError, ValueError, EOFError) as e:
                bad_data(path, f"is missing or truncated ({(str(e).splitlines() or [''])[0][:80]})")
            if a.shape != shape:
                bad_data(path, f"has shape {a.shape}, meta.json says {shape}")
            return a

        self.x = load(f"{split}_{'latents' if self.latent else 'x'}", x_shape)
        self.y = load(f'{split}_y', (n,), None)
        # labels index the classes (an unconditional set: all 0)
        hi = max(meta['num_classes'], 1)
        if n and (self.y.min() < 0 or self.y.max() >= hi):
            bad_data(os.path.join(data_dir, f'{split}_y.npy'), f"has labels outside 0..{hi - 1}")
        self.hint = load(f'{split}_hint', (n, *meta['hint_shape'])) if meta.get('hint') else None
        self.scale, self.shift = meta.get('scaling_factor', 1.0), meta.get('shift_factor', 0.0)
        self.device = device
        self.text = []
        if text:
            self.text = [
                load(f'{split}_text', (n, L, D)),
                load(f'{split}_text_mask', (n, L)),
                load(f'{split}_text_pooled', (n, D)),
            ]
            empty = (
                load('empty_text', (L, D), None),
                load('empty_text_mask', (L,), None),
                load('empty_text_pooled', (D,), None),
            )
            self.empty = [torch.from_numpy(a).to(device) for a in empty]
        # resident (None = auto: on a GPU, if the split fits in a quarter of its free memory): the
        # split is copied to the device once, and a batch is a gather there: no host work, no
        # host->device copy in the step
        arrays = [self.x, self.y] + self.text + ([] if self.hint is None else [self.hint])
        if resident is None:
            resident = (
                device.type == 'cuda'
                and sum(a.nbytes for a in arrays) < torch.cuda.mem_get_info(device)[0] / 4
            )
        self.resident = resident
        if self.resident:
            self.x_dev, self.y_dev, *self.text_dev = [
                torch.from_numpy(np.array(a)).to(device) for a in arrays
            ]
            # the hint came last
            self.hint_dev = None if self.hint is None else self.text_dev.pop()

    def fetch(self, a, idx, resident=None):
        """a[idx] on the device: a device-side gather when the split is resident, else a gather from
        the memmap into pinned memory and an asynchronous copy, so the host can gather the next
        batch while the GPU computes."""
        # the indices, or the examples
        a = torch.from_numpy(np.asarray(idx) if resident is not None else a[idx])
        # pinned: a pageable copy would make the host wait for the GPU
        if self.device.type == 'cuda':
            a = a.pin_memory().to(self.device, non_blocking=True)
        return a if resident is None else resident[a]

    def get_text(self, idx, drop=None):
        """Captions of idx as (states fp32 [B,L,D], mask bool [B,L], pooled fp32 [B,D]) on the
        device; where drop [B] is True, the empty caption's (classifier-free guidance dropout)."""
        out = []
        for i, (a, e) in enumerate(zip(self.text, self.empty)):
            a = self.fetch(a, idx, self.text_dev[i] if self.resident else None)
            a = a if drop is None else torch.where(drop.view(-1, *[1] * (a.dim() - 1)), e, a)
            out.append(a if a.dtype == torch.bool else a.float())
        return tuple(out)

    def get_hint(self, idx, flip=None):
        """Hint maps of idx as float [B, 1, H, W] in [0, 1] on the device; flip [B] bool mirrors
        them like get's latents."""
        if self.hint is None:
            raise SystemExit(
                "error: this dataset has no hints: "
                "re-run prepare.py with --hint=canny, mask or file"
            )
        h = self.fetch(self.hint, idx, self.hint_dev if self.resident else None).float() / 255
        return h if flip is None else torch.where(flip.view(-1, 1, 1, 1), h.flip(-1), h)

    def batch(self, idx, draws):
        """The Batch of examples idx with their draws: the latent sample and mirroring, label
        (caption) dropout, and the hints with hint dropout (where self.hints). Augmentations go
        here: drawn in draw(), applied to x0 (and the hint) here."""
        x0, y = self.get(idx, draws.eps, draws.flip)
        # a text model has only the null class; its dropout empties the caption instead
        text = self.get_text(idx, draws.drop) if self.text else None
        y = y * 0 if self.text else torch.where(draws.drop, self.null_class, y)
        hint = None
        if self.hints:
            hint = self.get_hint(idx, draws.flip) * ~draws.empty.view(-1, 1, 1, 1)
        if draws.aug is None:
            return Batch(x0, y, text, hint)
        x0 = augment.apply(x0, draws.aug, draws.aug_noise, self.augment)
        # a hint map moves with its image (the geometric transforms only)
        hint = None if hint is None else augment.warp(hint, draws.aug)
        return Batch(x0, y, text, hint, draws.aug if self.augment_cond else None)

    def __len__(self):
        return len(self.y)

    def get(self, idx, eps=None, flip=None):
        """(x0, y) on the device. Latents: eps [B, C, h, w] and flip [B] bool pick the sample; None
        = mean, unflipped. Pixels: flip [B] bool mirrors them (None: none)."""
        x = self.fetch(self.x, idx, self.x_dev if self.resident else None)
        y = self.fetch(self.y, idx, self.y_dev if self.resident else None)
        if not self.latent:
            # uint8 pixels -> [-1, 1], on the device; mirrored where flip says
            x = x.float() / 127.5 - 1
            if flip is not None:
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            return x, y
        x = x.float()
        pair = x[:, 0] if flip is None else torch.where(flip.view(-1, 1, 1, 1, 1), x[:, 1], x[:, 0])
        # [B, C, h, w] each
        mean, std = pair.unbind(1)
        z = mean if eps is None else mean + std * eps
        # the VAE's latent normalisation, recorded by prepare.py
        return (z - self.shift) * self.scale, y


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """A fresh permutation of the dataset each epoch, derived from (seed, epoch): computed once per
    epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step, n, global_batch, seed):
    """Indices of the global batch for `step`: a pure function of the step, so resuming needs no
    data state."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise SystemExit(
            f"error: the dataset has {n} images, fewer than the global batch {global_batch}: "
            "lower batch_size"
        )
    epoch, i = divmod(step, per_epoch)
    # sorted: near-sequential reads from the memmap (order within a batch does not matter; it is
    # sorted here, once, so every process slices the same sequence and pairs each image with the
    # same noise)
    return np.sort(epoch_order(n, seed, epoch)[i * global_batch : (i + 1) * global_batch])
