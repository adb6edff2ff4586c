"""
Hint maps for a control branch (ControlNet, Zhang et al. 2023): what prepare.py stores beside each
image as uint8 [1, H, W] at the pixel resolution (also for latent datasets: the model's hint encoder
brings it down).

    canny        edge maps, the detector of Canny 1986 ("A Computational Approach to Edge
                 Detection") in torch, batched: Gaussian blur, Sobel gradient, non-maximum
                 suppression, hysteresis. No OpenCV.
    shape_masks  the built-in shapes data: the exact mask of each drawn shape, from the
                 generator's own draws
The third kind, a user's NAME.hint.png beside NAME.png, is read by folders.read_hint (it decodes
like the image).
"""

import math

import torch
import torch.nn.functional as F

from shapes import SHAPES, draw_shape, shape_draws


def gaussian_kernel(sigma):
    """Normalised 1-D Gaussian, radius ceil(3 sigma): the tails beyond hold < 0.3% of the weight."""
    r = math.ceil(3 * sigma)
    if r == 0:
        return torch.ones(1, dtype=torch.float64)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    return k / k.sum()


def gradients(x, sigma):
    """Blur [B, 1, H, W] with a Gaussian of std sigma, then Sobel: (gx, gy), each the slope per
    pixel (the Sobel kernels / 8, so a ramp rising 1 a pixel reads 1). Edges are padded by
    replication: the frame is no edge."""
    k = gaussian_kernel(sigma).to(x)
    r = len(k) // 2
    # separable: rows, then columns
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode='replicate'), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode='replicate'), k.view(1, 1, -1, 1))
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).to(x) / 8
    x = F.pad(x, (1, 1, 1, 1), mode='replicate')
    # gy: the same kernel turned
    return F.conv2d(x, sx.view(1, 1, 3, 3)), F.conv2d(x, sx.t().reshape(1, 1, 3, 3))


def canny(images, sigma=1.0, low=0.1, high=0.2):
    """Canny edges of images uint8 [N, C, H, W] (or float in [0, 1]) -> uint8 [N, 1, H, W] on their
    device, 255 = edge.

    Thresholds are absolute, in units of edge contrast: `high` = 0.2 marks as a sure edge any step
    between two flat regions that differ by 20% of the full range (51 of 255), `low` as a possible
    one. Absolute rather than relative to each image's steepest gradient, so that a flat image (or
    one of faint noise) gets no edges instead of its noise, and every image of a dataset is judged
    alike. 0.1/0.2 are about ControlNet's cv2.Canny(img, 100, 200) (whose unnormalised Sobel reads a
    step of contrast c as 4c: 200 / 4 = 50 of 255). Colour edges count: each pixel takes the
    gradient of its steepest channel (a red shape on a grey background of the same brightness has no
    edge in grey)."""
    # a copy of numpy: memmaps are read-only
    x = images if torch.is_tensor(images) else torch.tensor(images)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    N, C, H, W = x.shape
    k = gaussian_kernel(sigma)
    # the crest slope of a blurred unit step: contrast 1 reads 1
    unit = k[len(k) // 2 : len(k) // 2 + 2].sum().item() / 2
    gx, gy = gradients(x.reshape(N * C, 1, H, W), sigma)
    gx, gy = gx.view(N, C, H, W), gy.view(N, C, H, W)
    mag = torch.hypot(gx, gy)
    # per pixel, the channel where the image changes most
    c = mag.argmax(1, keepdim=True)
    mag, gx, gy = mag.gather(1, c) / unit, gx.gather(1, c), gy.gather(1, c)

    # Non-maximum suppression: keep a pixel only where it is the crest of the gradient across the
    # edge, comparing it with its two neighbours along the gradient direction quantised to 0, 45, 90
    # or 135 degrees. A step that falls between two pixels gives them equal magnitudes: >= on one
    # side and > on the other keeps exactly one. y points down (rows), as in the image
    angle = torch.atan2(gy, gx) % math.pi
    # 0: along x, 1: x=y diagonal, 2: along y, 3: x=-y
    sector = ((angle + math.pi / 8) // (math.pi / 4)).long() % 4
    # zeros outside: a crest at the frame still counts
    p = F.pad(mag, (1, 1, 1, 1))
    # the neighbour at (y + dy, x + dx)
    shift = lambda dy, dx: p[..., 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
    ahead = torch.stack([shift(0, 1), shift(1, 1), shift(1, 0), shift(1, -1)]).gather(
        0, sector[None]
    )[0]
    behind = torch.stack([shift(0, -1), shift(-1, -1), shift(-1, 0), shift(-1, 1)]).gather(
        0, sector[None]
    )[0]
    crest = (mag > ahead) & (mag >= behind)

    # Hysteresis: strong crests are edges; weak ones are edges where they connect (8-neighbourhood)
    # to an edge, found by dilating the edges by one pixel into the weak crests until nothing
    # changes.
    weak = crest & (mag >= low)
    edge = crest & (mag >= high)
    while True:
        grown = F.max_pool2d(edge.float(), 3, stride=1, padding=1).bool() & weak
        if torch.equal(grown, edge):
            break
        edge = grown
    return edge.to(torch.uint8) * 255


def shape_masks(n, resolution, seed):
    """Yield the exact mask of each shape that shapes.shape_images(n, resolution, seed) draws, as
    uint8 [1, H, W]: drawn by the same code from the same draws, white on black, so it is 255
    inside, 0 outside and, on the edge, the fraction of the pixel the shape covers (the image's own
    antialiasing), never a guess from the pixels."""
    for y, box, _ in shape_draws(n, resolution, seed):
        yield draw_shape(SHAPES[y // 4], (255, 255, 255), box, (0, 0, 0), resolution)[None, :, :, 0]
