"""
Sample-quality yardsticks: numbers to compare runs, samplers, CFG scales and checkpoints by.

    # FD-DINOv2, precision, recall
    python metrics.py --samples=out-faces/samples --reference=data/faces
    # + the CLIP score of a text model's samples
    python metrics.py --samples=out-emoji/samples --reference=data/emoji \\
        --clip=openai/clip-vit-base-patch32

- Frechet distance (FD) between two sets of features, each summarised as a Gaussian (mean,
  covariance):
  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2) (Heusel et al. 2017, as FID). FD is
  biased upwards at small N, so every figure is printed with the sample counts it came from.
- FD-DINOv2: FD on DINOv2 features, which track human judgement better than Inception's (Stein et
  al. 2023, "Exposing flaws of generative model evaluation metrics"; their code is dgm-eval).
- Improved precision and recall (Kynkaenniemi et al. 2019): fidelity and diversity, separately.
- CLIP score for text models: how well each image matches its prompt, 100 * cos(image, prompt)
  embeddings, clamped at 0 in one of two named ways (--clip_clamp, named in the output line).
A prepare.py split's reference features are cached beside it (metrics_{split}_{encoder}.npz).
"""

import itertools
import json
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from checkpoint import atomic_write
from configurator import check
from data import IMAGE_EXTS
from model import setup_device

# -----------------------------------------------------------------------------
# a folder of generated PNG/JPG (sample.py --save_dir writes one, with samples.json)
samples = ''
# a prepare.py dataset folder (has meta.json) or any folder of images
reference = ''
# which split of a prepare.py dataset
split = 'val'
# image encoder for FD and precision/recall: hub id or folder, any DINOv2 size
encoder = 'facebook/dinov2-base'
# CLIP hub id or folder for the CLIP score of text models; '' = off
clip = ''
# where the CLIP score is clamped at 0: 'pair' = the mean of 100 * max(cos, 0), each pair clamped
# (Hessel et al. 2021's CLIP-S, on the 100 scale: their w = 2.5, so CLIP-S = this / 40); 'mean' =
# max(the mean of 100 * cos, 0), torchmetrics' CLIPScore. They differ when some cosines are < 0
clip_clamp = 'pair'
# precision/recall: a point's ball reaches its k-th nearest neighbour
k = 3
batch_size = 64
device = 'auto'
# -----------------------------------------------------------------------------


def check_config():
    """What each setting may be, in one place: a bad value is one line before any model is
    loaded."""
    check(globals(), positive=('k', 'batch_size'), choices={'clip_clamp': CLIP_CLAMPS})
    for key in ('samples', 'reference', 'encoder'):
        if not globals()[key]:
            sys.exit(f"error: --{key}=... is required")


def gaussian_stats(features):
    """(mean, covariance) of features [N, D], in float64 (the unbiased covariance, as FID
    implementations use)."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 samples, got {len(f)}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FD between N(mu1, sigma1) and N(mu2, sigma2), in float64. tr((S1 S2)^1/2) is computed as the
    sum of the square roots of the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (same
    eigenvalues as S1 S2): no complex numbers from a general matrix square root, and no negative
    round-off under the root."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    # S1^1/2, symmetric
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


# distance-matrix elements per block: 128 MB of float64, where 50k x 50k at once would be 20 GB
CHUNK = 2**24


def _knn_radii(x, k):
    """Distance from each point of x to its k-th nearest neighbour in x, itself excluded."""
    rows = max(1, CHUNK // len(x))
    # the smallest distance in each row is the point to itself (0), so the k-th neighbour is the
    # (k+1)-th value
    # (topk: ~10x faster than kthvalue on CPU)
    return torch.cat(
        [
            torch.cdist(x[i : i + rows], x).topk(k + 1, dim=1, largest=False).values[:, k]
            for i in range(0, len(x), rows)
        ]
    )


def _share_inside(points, centres, radii):
    """Share of `points` that lie in at least one ball (centres[j], radii[j]): the estimated
    manifold."""
    rows = max(1, CHUNK // len(centres))
    hits = sum(
        int((torch.cdist(points[i : i + rows], centres) <= radii).any(1).sum())
        for i in range(0, len(points), rows)
    )
    return hits / len(points)


def precision_recall(real, fake, k=3, device='cpu'):
    """Improved precision and recall (Kynkaenniemi et al. 2019, "Improved Precision and Recall
    Metric for Assessing Generative Models") of feature sets real [N, D] and fake [M, D] ->
    (precision, recall). A set's manifold is the union of balls around its points, each reaching to
    that point's k-th nearest neighbour in the same set. precision = share of fake points inside the
    real manifold; recall = share of real points inside the fake one. float64, the distance matrix
    in row chunks, so memory stays bounded for N, M up to ~50k."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} points in each set, "
            f"got {len(real)} and {len(fake)}"
        )
    precision = _share_inside(fake, real, _knn_radii(real, k))
    recall = _share_inside(real, fake, _knn_radii(fake, k))
    return precision, recall


def load_pretrained(name, what, *loaders):
    """Each loader(name) in turn (transformers from_pretrained, hub id or folder); a model that
    cannot be loaded (missing folder, offline hub id, not a model) is one line naming it, not a
    traceback."""
    if (os.path.isabs(name) or name.startswith('.')) and not os.path.isdir(name):
        sys.exit(f"error: cannot load {what} '{name}': no such folder")
    try:
        return [load(name) for load in loaders]
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: cannot load {what} '{name}' ({msg[:200]})")


def load_image_encoder(name, dev):
    """A DINOv2 (any size; any AutoModel whose last_hidden_state[:, 0] is the final-normed CLS
    token) in eval mode."""
    import transformers as tf

    (model,) = load_pretrained(name, 'image encoder', tf.AutoModel.from_pretrained)
    return model.to(dev).eval()


# What dgm-eval (layer6ai-labs/dgm-eval, dgm_eval/models/dinov2.py, default clean_resize=False)
# feeds DINOv2: Image.open(path).convert('RGB') (dataloaders.py), torchvision Resize((224, 224),
# BICUBIC) on that PIL image, which is PIL's own bicubic resize to a square (aspect not kept, no
# crop), ToTensor (/255), then ImageNet mean/std; the feature is the hub model's output, the CLS
# token after the final LayerNorm (x_norm_clstoken). We match all of it on transformers' port of the
# same weights (close to dgm-eval's figures, not bit for bit: the position-embedding interpolation
# and kernels differ in detail). dgm-eval's default is ViT-L/14 (facebook/dinov2-large); base is
# cheaper. Not the models' own HF image processor: short side 256, crop 224.
DINO_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def dinov2_pixels(images):
    """PIL RGB images -> float32 [B, 3, 224, 224], preprocessed as dgm-eval does (above)."""
    x = np.stack(
        [
            np.asarray(im.resize((DINO_SIZE, DINO_SIZE), Image.Resampling.BICUBIC), np.float32)
            / 255
            for im in images
        ]
    )
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def dinov2_features(model, images, dev):
    """PIL images -> float32 features [B, D]: the CLS token after the final LayerNorm."""
    out = model(pixel_values=dinov2_pixels(images).to(dev))
    return out.last_hidden_state[:, 0].float().cpu().numpy()


def load_clip(name, dev):
    """-> (CLIPModel in eval mode, its processor: tokenizer + CLIP's resize/crop/normalise)."""
    import transformers as tf

    model, processor = load_pretrained(
        name, 'CLIP model', tf.CLIPModel.from_pretrained, tf.AutoProcessor.from_pretrained
    )
    return model.to(dev).eval(), processor


@torch.no_grad()
def clip_cosines(model, processor, images, prompts, dev):
    """cos(image embedding, prompt embedding) per pair, float32 [N], as torchmetrics computes it:
    each projected embedding divided by its L2 norm, then the sum of their product."""
    # longer prompts are truncated, as torchmetrics does
    n_pos = model.config.text_config.max_position_embeddings
    text = processor.tokenizer(
        list(prompts), padding=True, truncation=True, max_length=n_pos, return_tensors='pt'
    )
    pixels = processor.image_processor(images=list(images), return_tensors='pt')['pixel_values']
    img = model.get_image_features(pixel_values=pixels.to(dev))
    txt = model.get_text_features(
        input_ids=text['input_ids'].to(dev), attention_mask=text['attention_mask'].to(dev)
    )
    # transformers 5 returns an output whose pooler_output is the projected embedding; 4.x the
    # tensor itself
    img, txt = (e if torch.is_tensor(e) else e.pooler_output for e in (img, txt))
    img, txt = (e.float() / e.float().norm(p=2, dim=-1, keepdim=True) for e in (img, txt))
    return (img * txt).sum(-1).cpu().numpy()


# --clip_clamp -> how the output line names it
CLIP_CLAMPS = {
    'pair': "mean of 100 * max(cos, 0), each pair clamped: Hessel et al. 2021, w=100 not 2.5",
    'mean': "max(mean of 100 * cos, 0), the mean clamped, as torchmetrics' CLIPScore",
}


def clip_score(cos, clamp):
    """The CLIP score of pairs with cosines cos [N], in float64, clamped at 0 per pair or once on
    the mean. Checked against each source:
    'pair', Hessel et al. 2021 (jmhessel/clipscore, clipscore.py get_clip_score):
    per = w * np.clip(cos, 0, None), the score np.mean(per); w = 2.5 there, 100 here.
    'mean', torchmetrics (Lightning-AI/torchmetrics, functional/multimodal/clip_score.py):
    _clip_score_update returns score = 100 * (source_features * target_features).sum(axis=-1),
    unclamped; CLIPScore.update adds score.sum(0) and compute returns
    torch.max(self.score / self.n_samples, zeros). Its docstring writes max(100 * cos, 0) as if
    per pair, but its code clamps the mean: we follow the code."""
    scores = 100 * np.asarray(cos, np.float64)
    if clamp == 'pair':
        return float(np.maximum(scores, 0).mean())
    if clamp == 'mean':
        return float(max(scores.mean(), 0.0))
    raise ValueError(f"clip_clamp must be one of {', '.join(CLIP_CLAMPS)}, got {clamp!r}")


def list_images(folder):
    """Image files under folder, recursively, in a fixed (sorted) order. Symlinks are followed, but
    each real folder is walked once and each real file listed once: a link to the folder itself, to
    a folder above it (a loop, which os.walk would follow ~40 levels deep) or to one already walked
    is skipped, and the skips are named in one line."""
    top = os.path.realpath(folder)
    found, walked, listed, loops = [], set(), set(), []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        # walked already, or above the top (it holds the top, so it would lead back into it)
        if real in walked or (root != folder and os.path.commonpath([real, top]) == real):
            dirs[:] = []
            loops.append(f"{root} -> {real}")
            continue
        walked.add(real)
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            if f.lower().endswith(IMAGE_EXTS) and os.path.realpath(path) not in listed:
                listed.add(os.path.realpath(path))
                found.append(path)
    if loops:
        print(
            f"skipped {len(loops)} symlinked folder(s) that loop or were walked already: "
            + ', '.join(loops[:3])
            + (', ...' if len(loops) > 3 else '')
        )
    return found


def iter_images(paths, what):
    """Yield (index, PIL RGB image); files that cannot be decoded are skipped, counted and the first
    one named."""
    skipped = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.load()
                # as dgm-eval reads images
                rgb = im.convert('RGB')
        # truncated, not an image, a decompression bomb...: counted, never silently dropped
        except Exception as e:
            skipped.append(f"{path} ({type(e).__name__}: {str(e)[:80]})")
            continue
        yield i, rgb
    if skipped:
        print(f"skipped {len(skipped)} unreadable {what} image(s); first: {skipped[0]}")


def chunked(items, n):
    """Lists of up to n items from an iterable (images are decoded one batch at a time, never all in
    RAM)."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def read_samples(folder):
    """-> (image paths, prompts or None). sample.py --save_dir writes samples.json ("files",
    "prompts", ...) beside the images: then its list, in its order, so prompts line up; otherwise
    every image file under the folder."""
    if not os.path.isdir(folder):
        sys.exit(f"error: --samples={folder} is not a folder")
    index = os.path.join(folder, 'samples.json')
    if not os.path.exists(index):
        return list_images(folder), None
    try:
        with open(index, encoding='utf-8') as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = None
    files, prompts = (
        (info.get('files'), info.get('prompts')) if isinstance(info, dict) else (None, None)
    )
    strings = lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)
    if not strings(files) or not (
        prompts is None or strings(prompts) and len(prompts) == len(files)
    ):
        sys.exit(
            f"error: {index} is unreadable or malformed: "
            f"want {{'files': [names], 'prompts': [one per file]}}"
        )
    return [os.path.join(folder, f) for f in files], prompts


def reference_images(folder):
    """-> (number of images, iterable of PIL images, description, cache path or None): a prepare.py
    split or a folder."""
    if not os.path.exists(os.path.join(folder, 'meta.json')):
        if not os.path.isdir(folder):
            sys.exit(f"error: --reference={folder} is not a folder")
        paths = list_images(folder)
        return (
            len(paths),
            (im for _, im in iter_images(paths, 'reference')),
            f"images under {folder}",
            None,
        )
    from data import read_meta

    splits = read_meta(folder)['splits']
    if split not in splits:
        sys.exit(f"error: {folder} has no split '{split}' (meta.json lists {', '.join(splits)})")
    n, path = splits[split], os.path.join(folder, f'{split}_x.npy')
    try:
        x = np.load(path, mmap_mode='r')
    except (OSError, ValueError, EOFError) as e:
        sys.exit(f"error: cannot read {path} ({str(e)[:80]}): re-run prepare.py")
    if x.shape[0] != n or x.ndim != 4 or x.shape[1] != 3 or x.dtype != np.uint8:
        sys.exit(
            f"error: {path} is {x.dtype} {x.shape}, meta.json says uint8 [{n}, 3, H, W]: "
            f"re-run prepare.py"
        )
    # 'facebook/dinov2-base' -> facebook_dinov2-base
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', encoder).strip('_.')
    images = (Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))) for a in x)
    return (
        n,
        images,
        f"'{split}' split of {folder}",
        os.path.join(folder, f'metrics_{split}_{name}.npz'),
    )


def read_cache(path, n, dim):
    """Cached reference features [n, dim], or None: absent, unreadable (torn, foreign) or stale
    (another count)."""
    try:
        with np.load(path) as z:
            f = z['features']
    except FileNotFoundError:
        return None
    # recompute rather than trust it
    except Exception as e:
        print(
            f"note: {path} is unreadable ({type(e).__name__}): recomputing the reference features"
        )
        return None
    # the split was re-made, or another model was saved under the same name
    if f.shape != (n, dim):
        print(f"note: {path} holds features {f.shape}, want ({n}, {dim}): recomputing")
        return None
    return f


def sample_features(model, paths, prompts, clip_pair, dev):
    """-> (DINOv2 features [N, D] of the readable samples, their CLIP cosines against their own
    prompts or None)."""
    feats, cosines = [], []
    for batch in chunked(iter_images(paths, 'sample'), batch_size):
        feats.append(dinov2_features(model, [im for _, im in batch], dev))
        # '' = a class model's sample
        pairs = [(im, prompts[i]) for i, im in batch if clip_pair and prompts[i]]
        if pairs:
            cosines.append(clip_cosines(*clip_pair, *zip(*pairs), dev))
    if not feats:
        sys.exit(f"error: none of the {len(paths)} images in {samples} could be read")
    return np.concatenate(feats), (np.concatenate(cosines) if cosines else None)


def reference_features(model, ref, dim, dev):
    """DINOv2 features of the reference; a prepare.py split's are read from / written to the cache
    beside it."""
    n, images, what, cache = ref
    feats = read_cache(cache, n, dim) if cache else None
    if feats is not None:
        print(f"reference: {n} images, {what}; features read from {cache}")
        return feats
    feats = [dinov2_features(model, batch, dev) for batch in chunked(images, batch_size)]
    if not feats:
        sys.exit(f"error: no images to compare against: {what}")
    feats = np.concatenate(feats)
    try:
        if cache:
            atomic_write(cache, lambda f: np.savez(f, features=feats, encoder=encoder))
    # a read-only dataset folder: the figures still come, only without a cache
    except SystemExit as e:
        print(f"note: reference features not cached ({e.code})")
    print(
        f"reference: {len(feats)} images, {what}"
        + (f"; features written to {cache}" if cache else '')
    )
    return feats


def main():
    from configurator import configure

    configure(globals())
    check_config()
    dev = setup_device(device, 'float32')[0]
    # every input is checked before a model is loaded: a typo costs a second, not a model load
    paths, prompts = read_samples(samples)
    if not paths:
        sys.exit(f"error: no images ({', '.join(IMAGE_EXTS)}) in {samples}")
    if clip and not (prompts and any(prompts)):
        sys.exit(
            f"error: --clip needs prompts: "
            f"{samples}/samples.json from sample.py --save_dir of a text model"
        )
    ref = reference_images(reference)
    model = load_image_encoder(encoder, dev)
    clip_pair = load_clip(clip, dev) if clip else None

    fake, cosines = sample_features(model, paths, prompts, clip_pair, dev)
    real = reference_features(model, ref, fake.shape[1], dev)
    if min(len(real), len(fake)) < 2:
        sys.exit(
            f"error: a Frechet distance needs 2 images on each side, "
            f"got {len(fake)} samples and {len(real)} reference"
        )
    # round-off: never print -0.00
    fd = max(frechet_distance(*gaussian_stats(real), *gaussian_stats(fake)), 0.0)
    name = 'FD-DINOv2' if 'dinov2' in encoder.lower() else f'FD ({encoder})'
    # fewer images than feature dimensions: a singular covariance, and an FD that says little
    sizes = (('samples', len(fake)), ('reference', len(real)))
    small = [f"{what} ({n})" for what, n in sizes if n < fake.shape[1]]
    if small:
        print(
            f"warning: {' and '.join(small)} fewer than the {fake.shape[1]} feature dimensions: "
            "this FD is unreliable; use more samples, or --split=train as the reference"
        )
    print(
        f"{name} {fd:.2f} (N={len(fake)} samples vs {len(real)} reference; "
        f"FD is biased upwards at small N)"
    )
    if min(len(real), len(fake)) > k:
        precision, recall = precision_recall(real, fake, k, dev)
        print(f"precision {precision:.3f}, recall {recall:.3f} (k={k}; Kynkaenniemi et al. 2019)")
    # the features are computed by now: report what can be, and say what cannot
    else:
        print(f"precision/recall: --k={k} needs more than {k} images on each side")
    if clip and cosines is None:
        print("CLIP score: none of the readable samples has a prompt")
    elif clip:
        print(
            f"CLIP score {clip_score(cosines, clip_clamp):.2f} (clip_clamp='{clip_clamp}': "
            f"{CLIP_CLAMPS[clip_clamp]}; {len(cosines)} image-prompt pairs, {clip})"
        )


if __name__ == '__main__':
    main()
