"""
The built-in 'shapes' data: a circle, square or upward triangle in red, green, blue or yellow (12
classes, caption "a red circle"), random size, position and grey-ish background. Its point: the
factors that made an image can be read back from it, so the correctness of *generated* samples is
measured, not eyeballed.

    draw_shape / shape_images   generate (prepare.py stores them as a dataset); shape_draws: their
                                factors
    read_shape / grade          read a sample back: which shape and colour does it show? (accuracy)
    read_factors / factor_fd    ... and its size, position and background: how far is the
                                distribution of those from the real data's, class by class? (an FD
                                on the true factors: no network)
"""

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ['circle', 'square', 'triangle']
COLOURS = ['red', 'green', 'blue', 'yellow']
COLOUR_RGB = [(220, 40, 40), (40, 170, 60), (40, 80, 230), (235, 205, 30)]
# class = shape_index * 4 + colour_index
CLASS_NAMES = [f"{c} {s}" for s in SHAPES for c in COLOURS]
# the shapes captions; also the prompts graded
shape_caption = lambda label: f"a {CLASS_NAMES[label]}"

# ---------------------------------------------------------------- shapes: generate


def draw_shape(shape, colour, box, background, resolution, supersample=4):
    """Render one shape into an RGB uint8 [H,W,3] image. box = (x0, y0, x1, y1) in px, floats ok.
    colour: a name of COLOURS, or an RGB tuple (hints.shape_masks draws the shape in white on
    black)."""
    # draw big, then average down: cheap, exact-area antialiasing
    s = supersample
    img = Image.new('RGB', (resolution * s, resolution * s), tuple(int(v) for v in background))
    x0, y0, x1, y1 = (v * s for v in box)
    d = ImageDraw.Draw(img)
    fill = COLOUR_RGB[COLOURS.index(colour)] if isinstance(colour, str) else colour
    if shape == 'circle':
        # PIL boxes are inclusive, hence the -1
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == 'square':
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    # triangle pointing up, filling its box
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BOX))


def shape_draws(n, resolution, seed):
    """Yield n (class index, box, background RGB) draws: the factors shape_images renders, so a test
    can compare what is read back from an image with what made it. Deterministic in (n, resolution,
    seed)."""
    rng = np.random.default_rng(seed)
    # balanced classes, random order
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    for y in labels:
        # 12..26 px at 32 px
        side = rng.uniform(0.375, 0.8125) * resolution
        # fully inside, 1 px margin
        x0, y0 = rng.uniform(1, resolution - 1 - side, size=2)
        # low-saturation background (max-min of RGB <= 24) so the shape separates by saturation
        bg = np.clip(rng.uniform(0.1, 0.9) * 255 + rng.uniform(-12, 12, size=3), 0, 255)
        yield int(y), (x0, y0, x0 + side, y0 + side), bg


def shape_images(n, resolution, seed):
    """Yield n (uint8 [3,H,W] image, class index) pairs; deterministic in (n, resolution, seed)."""
    for y, box, bg in shape_draws(n, resolution, seed):
        img = draw_shape(SHAPES[y // 4], COLOURS[y % 4], box, bg, resolution)
        yield img.transpose(2, 0, 1), y


# ---------------------------------------------------------------- shapes: read back (grading)

_REF_HUE = np.asarray(Image.fromarray(np.uint8([COLOUR_RGB])).convert('HSV'))[0, :, 0].astype(int)


def _largest_component(mask):
    """Largest 4-connected component of a bool mask: propagate the min pixel index until stable."""
    big = mask.size
    lab = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new[~mask] = big
        if np.array_equal(new, lab):
            break
        lab = new
    return lab == np.bincount(lab[mask]).argmax()


def shape_mask(img):
    """A uint8 image [H,W,3] or [3,H,W] -> ([H,W,3], the coloured shape's mask), the mask None if
    there is no readable shape."""
    img = np.asarray(img, dtype=np.uint8)
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    H, W, _ = img.shape
    sat = img.max(-1).astype(int) - img.min(-1)
    # threshold at half the shape's saturation ~ half pixel coverage, so the mask has the true
    # outline even if a model renders colours a little washed out; the floor keeps grey bg out
    mask = sat > max(40, 0.5 * np.percentile(sat, 99))
    if mask.sum() < 0.03 * H * W:
        return img, None
    # drop specks of noise away from the shape
    mask = _largest_component(mask)
    ys, xs = np.nonzero(mask)
    if mask.sum() < 0.03 * H * W or np.ptp(xs) >= 0.9 * W or np.ptp(ys) >= 0.9 * H:
        # too small, or fills the frame: a coloured background is no shape
        return img, None
    return img, mask


def triangle_orientation(img):
    """Which way a triangle points, 'up' (as the data draws them), 'down', 'left' or 'right': the
    ideal triangle of each orientation in the shape's bounding box that its mask best overlaps
    (augmented training must not leak rotations into samples); None if no shape is readable."""
    _, mask = shape_mask(img)
    if mask is None:
        return None
    ys, xs = np.nonzero(mask)
    m = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    v, u = (np.mgrid[: m.shape[0], : m.shape[1]] + 0.5) / np.array(m.shape)[:, None, None]
    ideal = dict(
        up=np.abs(u - 0.5) <= v / 2,
        down=np.abs(u - 0.5) <= (1 - v) / 2,
        left=np.abs(v - 0.5) <= u / 2,
        right=np.abs(v - 0.5) <= (1 - u) / 2,
    )
    return max(ideal, key=lambda k: (m & ideal[k]).sum() / (m | ideal[k]).sum())


def read_factors(img):
    """Read back the factors of a uint8 image [H,W,3] or [3,H,W]: a dict of shape, colour, size (the
    mask's bounding box, longer side / width), x and y (the box's centre / width, height; 0 =
    left/top edge) and background (mean grey of the pixels more than 2 px away from the shape /
    255); None if no shape is readable. Built to grade generated samples, so it tolerates noise and
    blur but rejects garbage."""
    img, mask = shape_mask(img)
    if mask is None:
        return None
    H, W, _ = img.shape
    ys, xs = np.nonzero(mask)
    # colour: majority vote of per-pixel nearest reference hue; noise has no clear majority
    hue = np.asarray(Image.fromarray(img).convert('HSV'))[..., 0][mask].astype(int)
    dist = np.abs(hue[:, None] - _REF_HUE[None, :])
    votes = np.bincount(np.minimum(dist, 256 - dist).argmin(1), minlength=len(COLOURS))
    if votes.max() < 0.6 * len(hue):
        return None
    # shape: best IoU between the mask and each ideal shape drawn into the mask's bounding box
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    v, u = np.mgrid[y0:y1, x0:x1] + 0.5
    # pixel centres in [0,1] within the box
    u, v = (u - x0) / (x1 - x0), (v - y0) / (y1 - y0)
    ideal = [
        (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        np.ones_like(u, bool),
        np.abs(u - 0.5) <= v / 2,
    ]
    m = mask[y0:y1, x0:x1]
    iou = [(m & t).sum() / (m | t).sum() for t in ideal]
    if max(iou) < 0.6:
        return None
    # background: pixels beyond the shape's antialiased edge (the mask grown by 2 px in every
    # direction)
    near = np.zeros_like(mask)
    padded = np.pad(mask, 2)
    for dy in range(5):
        for dx in range(5):
            near |= padded[dy : dy + H, dx : dx + W]
    # a frame-filling shape: whatever is not the shape
    away = img[~near] if (~near).any() else img[~mask]
    return dict(
        shape=SHAPES[int(np.argmax(iou))],
        colour=COLOURS[int(votes.argmax())],
        size=float(max(x1 - x0, y1 - y0) / W),
        x=float((x0 + x1) / 2 / W),
        y=float((y0 + y1) / 2 / H),
        background=float(away.mean()) / 255,
    )


def read_shape(img):
    """Which (shape, colour) does a uint8 image [H,W,3] or [3,H,W] show? ('none', 'none') if
    unclear."""
    f = read_factors(img)
    return ('none', 'none') if f is None else (f['shape'], f['colour'])


def grade(images, labels):
    """Score images (uint8 [N,3,H,W] or [N,H,W,3]) against shapes class labels. Returns
    (accuracy, per_class): accuracy = fraction read back as exactly the label's shape and colour,
    per_class = list of 12 accuracies (nan for classes with no images)."""
    labels = np.asarray(labels).astype(int)
    ok = np.array(
        [read_shape(img) == (SHAPES[y // 4], COLOURS[y % 4]) for img, y in zip(images, labels)]
    )
    per_class = [
        float(ok[labels == c].mean()) if (labels == c).any() else float('nan')
        for c in range(len(CLASS_NAMES))
    ]
    return float(ok.mean()) if len(ok) else float('nan'), per_class


# what factor_fd compares: the generator's random draws, read back
FACTORS = ('size', 'x', 'y', 'background')


def factor_matrix(images):
    """FACTORS of each image (uint8 [N,3,H,W] or [N,H,W,3]) as float64 [N, 4]; a row of NaN where
    unreadable."""
    rows = [read_factors(img) for img in images]
    return np.array(
        [[f[k] for k in FACTORS] if f else [np.nan] * 4 for f in rows], np.float64
    ).reshape(-1, 4)


def factor_fd(images, labels, ref_images, ref_labels):
    """A distribution metric for the shapes data that needs no network: the Frechet distance between
    the 4-D distribution of FACTORS (size, x, y, background) of samples and that of real images,
    read back the same way (so the reader's small biases cancel). images/ref_images: uint8 images,
    or their factor_matrix.

    per_class[c] = FD between the Gaussians (mean, covariance) of the factors of the readable
    samples asked for class c and of the readable real images of class c: 0 for a perfect sampler,
    up to the sampling noise of finite N (it is biased upwards at small N: compare at equal N). Per
    class is what exposes mode collapse (every red circle the same size in the same place) that a
    pooled distribution would hide. overall = the plain mean of per_class over the classes that
    occur in `labels`; NaN if any of them has fewer than 2 readable images on either side (a class
    drawn unreadably has no distribution to compare). Unreadable samples are left out here (accuracy
    counts them). Returns dict(overall, per_class: {class: FD}, n: {class: readable samples}, n_ref:
    {class: readable real images})."""
    # lazily: prepare.py imports this file too
    from metrics import frechet_distance, gaussian_stats

    f = images if np.ndim(images) == 2 else factor_matrix(images)
    r = ref_images if np.ndim(ref_images) == 2 else factor_matrix(ref_images)
    labels, ref_labels = np.asarray(labels).astype(int), np.asarray(ref_labels).astype(int)
    per_class, n, n_ref = {}, {}, {}
    for c in sorted(set(labels.tolist())):
        a = f[(labels == c) & ~np.isnan(f).any(1)]
        b = r[(ref_labels == c) & ~np.isnan(r).any(1)]
        n[c], n_ref[c] = len(a), len(b)
        ok = len(a) >= 2 and len(b) >= 2
        per_class[c] = (
            frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) if ok else float('nan')
        )
    overall = float(np.mean(list(per_class.values()))) if per_class else float('nan')
    return dict(overall=overall, per_class=per_class, n=n, n_ref=n_ref)
