"""
The augmentation experiment (RESULTS.md, "Augmentation"): the demo's recipe (config/shapes.py) on
240 training images (20 a class), trained three ways for the same steps: without augmentation, with
EDM's non-leaking augmentation (augment.py: the network is told what was applied and sampled with
'nothing'), and with the same augmentation but the network not told (the leak control). Each model
is sampled (per_class a class, 20 steps, CFG 4) and scored on what a small-data run gets wrong:

- accuracy: shape and colour read back as asked (shapes.grade)
- factor FD: size, position and background per class against the real val images (shapes.py)
- copies: the share of samples whose nearest training image (pixel L2) is closer than copy_ratio
  times their nearest val image's, both sets 240 images: a memorised image is far closer to its
  training original than to any other real image. The line 'real' is 240 other val images scored
  the same way, the rate that chance gives.
- upright: the share of triangle samples that point up, as every training triangle does
  (shapes.triangle_orientation): rotations leak into samples where this drops.

    python bench_augment.py     # 3 runs of config/shapes.py side by side on 2 CPU cores
    python bench_augment.py --score=out-augment-9600     # one trained run's row

A run already in out_dir is reused, not retrained: delete it after changing a setting.
"""

import os
import subprocess
import sys

import numpy as np
import torch

from checkpoint import load_model
from configurator import check, configure
from data import Data
from images import sample_images
from shapes import factor_fd, factor_matrix, grade, triangle_orientation

# -----------------------------------------------------------------------------
data_dir = 'data/shapes-240'
num_train = 240
out_dir = 'out-augment'
# the augmentation: rotations and hue shifts, each on half the examples (strong enough to leak;
# a quarter of the examples are left as they are)
augment = 'rotate:0.5,hue:0.5'
# train.py overrides for all three runs, e.g. "--max_iters=2400"
train_args = ''
# instead of the three runs: score this trained run's folder alone (e.g. one trained longer)
score = ''
per_class = 40
copy_ratio = 0.5
seed = 0
# -----------------------------------------------------------------------------
RUNS = (
    ('none', []),
    ('augmented', ['--augment={augment}']),
    ('not told', ['--augment={augment}', '--augment_cond=False']),
)


def prepare():
    """The 240-image training set (prepare.py's draws, its usual val split)."""
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        cmd = [sys.executable, 'prepare.py', f'--num_train={num_train}', f'--out_dir={data_dir}']
        subprocess.run(cmd, check=True)


def start(name, extra):
    """One run of config/shapes.py on the small set into out_dir/name, in the background on one
    thread (the runs share the machine); None if it is done."""
    out = os.path.join(out_dir, name.replace(' ', '-'))
    if os.path.exists(os.path.join(out, 'model.safetensors')):
        return None
    args = [a.format(augment=augment) for a in extra] + train_args.split()
    cmd = ['train.py', 'config/shapes.py', f'--data_dir={data_dir}', f'--out_dir={out}']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable] + cmd + args, env=env)


def nearest(a, b, chunk=256):
    """For each image of a, the L2 distance to its nearest image in b (uint8 [N, 3, H, W])."""
    b = torch.from_numpy(np.asarray(b, np.float32).reshape(len(b), -1))
    a = torch.from_numpy(np.asarray(a, np.float32).reshape(len(a), -1))
    return torch.cat(
        [torch.cdist(a[i : i + chunk], b).min(1).values for i in range(0, len(a), chunk)]
    )


def copies(images, train_x, val_x):
    """The share of images nearer to a training image than copy_ratio x their nearest val image."""
    return float((nearest(images, train_x) < copy_ratio * nearest(images, val_x)).float().mean())


def upright(images, labels):
    """The share of triangle images (classes 8-11) whose triangle points up."""
    turns = [triangle_orientation(img) for img, y in zip(images, labels) if y >= 8]
    read = [t for t in turns if t]
    return sum(t == 'up' for t in read) / max(len(read), 1)


def scores(images, labels, train_x, val_x, reference):
    acc, _ = grade(images, labels)
    fd = factor_fd(images, labels, *reference)['overall']
    return acc, fd, copies(images, train_x, val_x), upright(images, labels)


def main():
    configure(globals(), sys.argv[1:])
    check(globals(), positive=('num_train', 'per_class', 'copy_ratio'))
    if score and not os.path.exists(os.path.join(score, 'ckpt.pt')):
        raise SystemExit(f"error: --score={score} has no ckpt.pt: name a train.py out_dir")
    prepare()
    train_x = Data(data_dir, 'train', torch.device('cpu')).x
    val = Data(data_dir, 'val', torch.device('cpu'))
    # the nearest-val yardstick and the 'real' row use disjoint halves of the val split
    n = min(num_train, len(val) // 2)
    val_x, real_x, real_y = val.x[:n], val.x[n : 2 * n], val.y[n : 2 * n]
    reference = (factor_matrix(val.x), val.y)
    rows = [('real', scores(real_x, real_y, train_x, val_x, reference))]
    folders = {name: os.path.join(out_dir, name.replace(' ', '-')) for name, _ in RUNS}
    if score:
        folders = {os.path.basename(os.path.normpath(score)): score}
    else:
        runs = [start(name, extra) for name, extra in RUNS]
        if any(p.wait() for p in filter(None, runs)):
            raise SystemExit(f"error: a training run failed (its output is above): see {out_dir}")
    for name, out in folders.items():
        model, diffusion, meta, _ = load_model(os.path.join(out, 'ckpt.pt'), torch.device('cpu'))
        labels = torch.arange(meta['num_classes']).repeat_interleave(per_class)
        images = sample_images(model, diffusion, labels, meta, 4.0, seed=seed, steps=20).numpy()
        rows.append((name, scores(images, labels.numpy(), train_x, val_x, reference)))
    print(
        f"{num_train} training images; {per_class} samples a class (20 steps, CFG 4); copies: "
        f"nearest training image < {copy_ratio:g} x nearest of {n} val images"
    )
    width = max(12, *(len(name) + 1 for name, _ in rows))
    print(f"{'':<{width}}{'accuracy':>9}{'factor FD':>11}{'copies':>8}{'upright':>9}")
    for name, (acc, fd, copied, up) in rows:
        print(f"{name:<{width}}{100 * acc:>8.1f}%{fd:>11.4f}{100 * copied:>7.1f}%{100 * up:>8.1f}%")


if __name__ == '__main__':
    main()
