"""
Sample from a trained checkpoint with classifier-free guidance, write a PNG grid:

    python sample.py --out_dir=out-shapes                # every class -> out-shapes/grid.png
    python sample.py --out_dir=out-shapes --grade=True   # shapes: accuracy and factor FD, read back
    python sample.py --out_dir=out-shapes --save_dir=samples --num_samples=5000  # for metrics.py
    python sample.py --out_dir=out-shapes --sampler=ddpm --steps=1000 --spacing=linspace
    python sample.py --out_dir=out-emoji --prompt="red heart" --prompt="grinning face"  # text
    python sample.py --out_dir=out-emoji --prompts=prompts.txt      # text: one prompt per line
    python sample.py --out_dir=out-mask --hint=mask.png --control_scale=0.8  # a control branch
    python sample.py --out_dir=out-mask --hint=val        # the val hints, one per column, shown
    python sample.py --out_dir=out-distill --ckpt_name=student1.pt   # a student: its own steps
    python sample.py --weights=DiT-XL-2-256x256.pt --out_dir=out-dit   # a public DiT (dit_weights)

Samplers (samplers.py: sample_loop, on the alpha/sigma of diffusion.Diffusion): UniPC 1/2/3 (Zhao
et al. 2023; the default: order 3 on the 'flowtime' grid below 30 steps, 'logsnr' above, for every
objective: samplers.default_solver, chosen by bench_samplers.py), DPM-Solver++ 1/2/3 (Lu et al.
2022), DDIM (Song et al. 2021, eta >= 0), DDPM ancestral (Ho et al. 2020), Euler/Heun for flow
models. CFG: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022). Each is checked against
diffusers' scheduler of the same name in tests/test_sampler.py. Fit a 5-step solver to this
checkpoint (samplers.tune_solver; saved in out_dir/grids.json, used from then on):

    python sample.py --out_dir=out-shapes --steps=5 --tune=True
"""

import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import distill
from checkpoint import atomic_write, load_model
from configurator import check
from data import Data, read_meta
from diffusion import SPACINGS
from images import (
    class_labels,
    control_grade,
    encode_prompts,
    read_hint,
    sample_images,
    save_grid,
    shapes_reference,
    val_captions,
    with_hints,
)

from model import input_shape, setup_device
from fitted import fit_for, read_grids, tune_and_save, weights_digest
from samplers import SAMPLERS, default_solver, solver_name

# -----------------------------------------------------------------------------
# where the checkpoint is, and where the grid goes
out_dir = 'out'
# or 'best.pt', or 'model.safetensors' (the shareable export: EMA weights)
ckpt_name = 'ckpt.pt'
# instead of out_dir/ckpt_name: a public DiT (dit_weights.py), an official facebookresearch/DiT
# .pt, a diffusers DiT folder or hub id; the grid still goes to out_dir
weights = ''
# solver steps; NFE = steps (heun: 2*steps-1); CFG's cond+uncond is one batched call;
# 0 = auto: 20, or a distilled student's own (its checkpoint records its steps and grid)
steps = 0
# 'dpm++', 'unipc', 'ddim', 'ddpm', 'euler', 'heun' (the last two: flow models);
# 'auto': the default (samplers.default_solver, chosen by bench_samplers.py)
sampler = 'auto'
# dpm++ and unipc order: 1, 2 or 3; 0 = the default's
order = 0
# step times: 'logsnr', 'karras', time-uniform 'linspace', 'leading', 'trailing', or
# 'auto': the solver tuned to this checkpoint (out_dir/grids.json) if any, else the default's
spacing = 'auto'
# first fit the solver to this checkpoint (samplers.tune_solver), save it to grids.json
tune = False
# noise samples the solver is fitted on (classes in turn); its iterate is selected on as many
# others, and it is kept only where it wins on 4x as many more (fitted.CHECK, samplers.fit_verdict)
tune_batch = 48
# its gradient steps: ~3 * tune_iters * steps model calls on tune_batch samples
tune_iters = 200
# ddim: 0 = deterministic, 1 = DDPM
eta = 0.0
# Imagen dynamic thresholding quantile of |x0| (e.g. 0.995); 0 = off
threshold = 0.0
threshold_max = 1.0
# 1 = no guidance
cfg_scale = 4.0
# grid: images per class or prompt (unconditional models: per_class * 8 images)
per_class = 8
# the classes to draw (grid, save_dir, grade), by name or index, comma-separated, e.g.
# --classes="red circle,blue square" or --classes=0,5; '' = every class
classes = ''
# text models: --prompt="a red circle", repeatable (default: the dataset's val captions);
# read from the command line by read_prompts: every --prompt=... counts
prompt = ''
# text models: a text file, one prompt per line
prompts = ''
# a control branch's hint: an image (every sample's), or 'val': the dataset's val hints, one
# per grid column (save_dir: each val hint in turn); '' = none, the base model (not --grade's)
hint = ''
# the branch's strength: 0 = the base model, 1 = as trained
control_scale = 1.0
# shapes only: sample grade_per_class images per class and read them back; a control model:
# the first grade_hints val hints, each with its image's class, with the branch and as the base
grade = False
grade_per_class = 40
grade_hints = 240
# --grade's real images (the val split) and default prompts; '' = the model's dataset
data_dir = ''
# instead of the grid: num_samples PNGs + samples.json here (what metrics.py reads)
save_dir = ''
# with save_dir: the classes (or prompts) in turn, deterministic from seed
num_samples = 0
# with save_dir: also save_dir.npz, the PNGs as one uint8 [N, H, W, 3] array (ADM's evaluator)
npz = False
batch_size = 256
use_ema = True
seed = 0
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------


def chosen_classes(meta):
    """The class indices --classes names (names or indices), in its order; every class if none."""
    n, names = meta['num_classes'], meta.get('class_names') or []
    if not classes:
        return list(range(n))
    if not n:
        sys.exit(f"error: --classes={classes!r}: {out_dir}/{ckpt_name} has no classes")
    chosen = []
    for item in (part.strip() for part in classes.split(',')):
        c = int(item) if item.isdigit() else names.index(item) if item in names else -1
        if not 0 <= c < n:
            known = ', '.join(names[:6]) + (', ...' if n > 6 else '')
            sys.exit(f"error: --classes: {item!r} is not a class: 0..{n - 1}, or a name ({known})")
        chosen.append(c)
    return chosen


def check_config():
    """What each setting may be, in one place: a bad value is one line before the checkpoint is even
    read."""
    check(
        globals(),
        positive=('per_class', 'grade_per_class', 'grade_hints', 'batch_size'),
        non_negative=('steps', 'eta', 'cfg_scale', 'seed'),
        fraction=('threshold',),
        choices=dict(
            sampler=('auto',) + SAMPLERS,
            order=(0, 1, 2, 3),
            spacing=('auto',) + SPACINGS,
            dtype=('auto', 'float32', 'bfloat16', 'float16'),
        ),
    )
    if tune and (spacing != 'auto' or sampler in ('ddpm', 'heun') or sampler == 'ddim' and eta > 0):
        sys.exit(
            "error: --tune=True fits the solver for --spacing=auto and a deterministic sampler of "
            "one call a step (not ddpm or heun; eta = 0)"
        )
    if threshold_max < 1:
        sys.exit(f"error: --threshold_max={threshold_max} must be >= 1")
    if num_samples < 0 or bool(save_dir) != (num_samples > 0):
        sys.exit(
            f"error: --save_dir={save_dir!r} and --num_samples={num_samples} go together: a "
            "folder, a count > 0"
        )
    if npz and not save_dir:
        sys.exit("error: --npz=True writes save_dir.npz: give --save_dir and --num_samples too")


def save_samples(generate, asked, labels, meta, folder, info):
    """One PNG per entry of `asked` (class indices or prompts) in `folder`, 000000.png, ..., sampled
    batch_size at a time (batch k from seed * 1_000_003 + k: the same command writes the same bytes,
    and a longer run starts with the same images), then folder/samples.json, atomically and last:
    when it exists, every file it names is complete. labels: the class each image was asked for, -1
    for none (a prompt that is no class, unconditional)."""
    manifest = os.path.join(folder, 'samples.json')
    files = []
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(manifest):
            # until the new one is written, no manifest names a mix of old and new files
            os.remove(manifest)
        with tqdm(total=len(asked), unit='img', desc=f'sampling to {folder}') as bar:
            for k, start in enumerate(range(0, len(asked), batch_size)):
                for img in generate(asked[start : start + batch_size], seed * 1_000_003 + k, start):
                    files.append(f"{len(files):06d}.png")
                    Image.fromarray(img.permute(1, 2, 0).numpy().squeeze()).save(
                        os.path.join(folder, files[-1])
                    )
                bar.update(min(batch_size, len(asked) - start))
    except OSError as e:
        raise SystemExit(f"error: cannot write samples to '{folder}' ({e.strerror or e})") from None
    names = meta.get('class_names') or []
    doc = dict(
        files=files,
        labels=labels,
        classes=[names[y] if y >= 0 else '' for y in labels],
        prompts=[a if isinstance(a, str) else '' for a in asked],
        **info,
    )
    text = (
        '{\n'
        + ',\n'.join(
            f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in doc.items()
        )
        + '\n}\n'
    )
    # one key a line: readable at any N
    atomic_write(manifest, lambda f: f.write(text.encode('utf-8')))
    return manifest


def write_npz(folder):
    """folder.npz: the PNGs samples.json names as one uint8 [N, H, W, 3] array arr_0, the batch
    format of ADM's evaluator (openai/guided-diffusion, evaluations/evaluator.py)."""
    with open(os.path.join(folder, 'samples.json'), encoding='utf-8') as f:
        files = json.load(f)['files']
    rgb = lambda name: np.asarray(Image.open(os.path.join(folder, name)).convert('RGB'))
    images = np.stack([rgb(name) for name in files])
    path = folder.rstrip('/') + '.npz'
    atomic_write(path, lambda f: np.savez(f, arr_0=images))
    return path


def read_prompts(argv, path, data_dir):
    """The prompts for a text model: every --prompt=... in argv (the flag repeats), then the lines
    of `path`; if there are none, the first 8 distinct captions of the dataset's val split."""
    found = [a.split('=', 1)[1] for a in argv if a.startswith('--prompt=')]
    if path:
        try:
            with open(path, encoding='utf-8') as f:
                found += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(
                f"error: cannot read --prompts file '{path}' ({getattr(e, 'strerror', None) or e})"
            )
        if not found:
            raise SystemExit(f"error: --prompts file '{path}' has no prompts (one per line)")
    if not found:
        try:
            found = list(val_captions(data_dir))
        except OSError:
            raise SystemExit(
                "error: a text model needs prompts: pass --prompt=\"...\" or --prompts=file.txt"
            ) from None
    return found


def solver_settings(diffusion, grids, digest, student=None):
    """What sample_loop gets: each 'auto' (order 0) setting from the default
    (samplers.default_solver), and for spacing 'auto' the solver fitted to these weights (digest)
    for this sampler, order, steps and cfg (its grid and matrix), if grids.json has one that won
    on held-out noise (fitted.fit_for). A distilled student
    (its checkpoint's record: steps, times) gets DDIM on its own grid, what it learned to take, when
    sampler and spacing are 'auto' and steps is its own. -> (solver dict, grids.json key)."""
    if student and student['steps'] == steps and sampler == 'auto' and spacing == 'auto':
        return dict(
            distill.solver(student),
            order=1,
            eta=0.0,
            threshold=threshold,
            threshold_max=threshold_max,
        ), None
    d = default_solver(diffusion.objective, steps)
    s = dict(
        sampler=d['sampler'] if sampler == 'auto' else sampler,
        order=order or d['order'],
        eta=eta,
        threshold=threshold,
        threshold_max=threshold_max,
    )
    key = f"{s['sampler']}{s['order']} {steps} steps cfg {cfg_scale:g}"
    tuned = (fit_for(grids, key, digest, out_dir) if spacing == 'auto' else None) or {}
    s['spacing'], s['matrix'] = (
        tuned.get('t', spacing if spacing != 'auto' else d['spacing']),
        tuned.get('matrix'),
    )
    return s, key


def main():
    global steps
    from configurator import configure

    argv = sys.argv[1:]
    # repeatable: read below
    configure(globals(), [a for a in argv if not a.startswith('--prompt=')])
    check_config()
    dev, _, autocast = setup_device(device, dtype)
    if weights:
        os.makedirs(out_dir, exist_ok=True)
    source = weights or os.path.join(out_dir, ckpt_name)
    model, diffusion, meta, train_config = load_model(source, dev, use_ema)
    # a distilled student's record (train.py --distill_steps)
    student = train_config.get('student')
    steps = steps or (student or {}).get('steps') or 20
    lo, hi = (student or {}).get('cfg') or (cfg_scale, cfg_scale)
    if not lo <= cfg_scale <= hi:
        print(
            f"warning: {out_dir}/{ckpt_name} learned CFG scales {lo:g} to {hi:g}: "
            f"--cfg_scale={cfg_scale:g} is outside them"
        )
    grids = read_grids(out_dir)
    # what identifies these weights, for a fit's (only where there is one to make or use)
    digest = weights_digest(model) if grids or tune else None
    solver, key = solver_settings(diffusion, grids, digest, student)
    if tune and key is None:
        raise SystemExit(
            "error: --tune=True: a distilled student samples on its own grid; name --sampler or "
            "--spacing"
        )
    is_text = bool(model.config.text_dim)
    if (prompts or any(a.startswith('--prompt=') for a in argv)) and not is_text:
        raise SystemExit(
            f"error: {out_dir}/{ckpt_name} is not a text model (it was trained on class labels): "
            "drop --prompt"
        )
    if classes and is_text:
        raise SystemExit(
            f"error: {out_dir}/{ckpt_name} is a text model: ask with --prompt, not --classes"
        )
    chosen = chosen_classes(meta)
    if hint and not model.config.hint_channels:
        raise SystemExit(
            f"error: {out_dir}/{ckpt_name} has no control branch (it was trained without hints): "
            "drop --hint"
        )
    data = data_dir or train_config.get('data_dir', '')
    # the grid's columns
    ncol = per_class if (meta['num_classes'] or is_text) else 8
    # a control branch's: image i gets hints[i % len(hints)]
    hints = None
    # one per grid column; save_dir: each in turn
    if hint == 'val':
        val = Data(data, 'val' if read_meta(data)['splits'].get('val') else 'train', dev)
        hints = val.get_hint(np.arange(min(num_samples, len(val)) if save_dir else ncol) % len(val))
    elif hint:
        hints = read_hint(hint, model.config.hint_size).to(dev)
    # on the classes in turn (a text model: the prompts in turn)
    if tune:
        asked = (
            read_prompts(argv, prompts, data)
            if is_text
            else list(range(max(meta['num_classes'], 1)))
        )
        asked = [asked[i % len(asked)] for i in range(tune_batch)]
        cond = encode_prompts(asked, meta, dev) if is_text else (None, None)
        labels = torch.tensor(
            [0] * tune_batch if is_text or not meta['num_classes'] else asked, device=dev
        )
        args = dict(globals(), steps=steps, autocast=autocast)
        shape = input_shape(meta)
        solver.update(
            tune_and_save(model, diffusion, labels, *cond, shape, solver, key, grids, args)
        )
    grid = solver['spacing']
    if not isinstance(grid, str):
        grid = 'tuned solver' if key else "the student's grid"
    how = f"{solver_name(solver['sampler'], solver['order'], grid)}, {steps} steps, cfg {cfg_scale}"
    kw = dict(
        cfg_scale=cfg_scale,
        autocast=autocast,
        batch_size=batch_size,
        steps=steps,
        control_scale=control_scale,
        **solver,
    )

    def generate(names, seed_, start=None):
        """Images for a list of prompts (text model) or class indices, one image each; with hints,
        image i gets hint start + i (start None: no hint)."""
        h = (
            None
            if hints is None or start is None
            else hints[(start + torch.arange(len(names), device=dev)) % len(hints)]
        )
        if not is_text:
            return sample_images(
                model, diffusion, torch.tensor(names, device=dev), meta, seed=seed_, hint=h, **kw
            )
        cond, empty = encode_prompts(names, meta, dev)
        labels = torch.zeros(len(names), dtype=torch.long, device=dev)
        return sample_images(
            model, diffusion, labels, meta, seed=seed_, text=cond, null_text=empty, hint=h, **kw
        )

    is_shapes = meta.get('dataset') == 'shapes'
    if grade and not is_shapes:
        raise SystemExit("error: --grade=True needs a model trained on the built-in 'shapes' data")
    control = grade and model.config.hint_channels
    # read first: a missing one fails before any sampling
    reference = shapes_reference(data) if grade and not control else None
    val = Data(data, 'val', dev, text=is_text) if control else None

    # single images for metrics.py, instead of the grid (a grid of thousands helps no one)
    if save_dir:
        # the prompts in turn; a shapes caption ("a red circle") is also that class
        if is_text:
            found = read_prompts(argv, prompts, data)
            asked = [found[i % len(found)] for i in range(num_samples)]
            from shapes import CLASS_NAMES, shape_caption

            caption_class = (
                {shape_caption(c): c for c in range(len(CLASS_NAMES))} if is_shapes else {}
            )
            labels = [caption_class.get(p, -1) for p in asked]
        # the classes in turn (balanced); an unconditional model: the null label, -1 in samples.json
        else:
            asked = [chosen[i % len(chosen)] if chosen else 0 for i in range(num_samples)]
            labels = asked if meta['num_classes'] else [-1] * num_samples
        info = dict(checkpoint=source, sampler=how, seed=seed)
        path = save_samples(generate, asked, labels, meta, save_dir, info)
        print(f"wrote {num_samples} images and {path} ({how}, seed {seed})")
        if npz:
            print(f"wrote {write_npz(save_dir)} (ADM's evaluator reads it)")
    else:
        if is_text:
            names = [p for p in read_prompts(argv, prompts, data) for _ in range(per_class)]
            images = generate(names, seed, 0)
        else:
            labels = [c for c in chosen for _ in range(per_class)]
            labels = labels or class_labels(meta, per_class).tolist()
            images = generate(labels, seed, 0)
            names = [meta['class_names'][i] if meta['num_classes'] else '' for i in labels]
        n = len(images)
        if hints is not None:
            images, names = with_hints(images, names, hints, ncol)
        path = os.path.join(out_dir, 'grid.png')
        save_grid(images, names, path, ncol=ncol)
        print(
            f"wrote {path} ({n} images{', hints in the first row' if hints is not None else ''}, "
            f"{how}, seed {seed})"
        )

    # how closely the samples follow val hints, with the branch and as the base model
    if control:
        name, rows = control_grade(model, diffusion, meta, val, grade_hints, seed=seed, **kw)
        print(
            f"{name} and class accuracy on the first {min(grade_hints, len(val))} val hints | {how}"
        )
        for scale, score, acc in rows:
            base = '' if scale else ' (the base model)'
            print(
                f"control_scale {scale:g}{base}: {name} {score:.3f}, "
                f"class accuracy {100 * acc:.1f}%"
            )
    elif grade:
        from shapes import factor_fd, grade as grade_images, shape_caption

        labels = torch.tensor(chosen).repeat_interleave(grade_per_class)
        # a text model is graded on the prompts "a red circle", ... (the shapes captions)
        images = generate(
            [shape_caption(i) for i in labels.tolist()] if is_text else labels.tolist(), seed + 1
        ).numpy()
        acc, per_class_acc = grade_images(images, labels.numpy())
        fd = factor_fd(images, labels.numpy(), *reference)
        n_read, n_real = sum(fd['n'].values()), sum(fd['n_ref'].values())
        undefined = '' if math.isfinite(fd['overall']) else ' (a class has < 2 readable samples)'
        print(
            f"conditional accuracy ({'text prompts' if is_text else 'class labels'}; shape and "
            f"colour read back right): {100 * acc:.1f}% of {len(labels)} samples | {how}"
        )
        print(
            f"factor FD (size, x, y, background vs the real images of {data} val; mean over "
            f"{len(fd['per_class'])} classes; 0 = the same distribution): "
            f"{fd['overall']:.4f}{undefined} | {n_read} of {len(labels)} samples readable, "
            f"{n_real} real"
        )
        per = [
            f"{meta['class_names'][c]} {100 * per_class_acc[c]:.0f}% {fd['per_class'][c]:.2g}"
            for c in chosen
        ]
        print('per class (accuracy, factor FD): ' + ', '.join(per))


if __name__ == '__main__':
    main()
