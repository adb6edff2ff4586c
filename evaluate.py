"""
What train.py does at each evaluation, out of its loop: the EMA's val loss, its eval grid of samples
and their grade (the built-in shapes data), keep-best (best.pt) and early stopping, the checkpoints,
and the log line (stdout, and Weights & Biases when asked for); the profiler's trace. Every function
reads the run's settings from cfg, train.py's config dict (its settings as the run uses them).
"""

import functools
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

import distill
from data import draw
from images import eval_samples, save_grid, save_loss_curve, shapes_reference

# the Weights & Biases run, when wandb_project is set (start_wandb)
wandb_run = None


@torch.no_grad()
def eval_loss(net, task, data, shape, autocast, cfg):
    """The objective's loss of the first eval_batches batches of data, at the same draws at every
    evaluation (a seed of their own) and without dropout."""
    losses = []
    n = cfg['batch_size']
    for i in range(cfg['eval_batches']):
        idx = np.arange(i * n, (i + 1) * n) % len(data)
        draws = draw(task.diffusion, i, len(idx), shape, data.device, cfg['seed'] + 1)
        batch = data.batch(idx, draws)
        with autocast:
            losses.append(task.eval_loss(net, batch, draws).item())
    return sum(losses) / len(losses)


def sample_grid(ema, diffusion, meta, val_data, reference, autocast, cfg):
    """The EMA's eval grid, and its shapes grade if asked: (images, captions, graded or None). A
    distilled student is sampled as it was trained: DDIM on its grid, at its steps."""
    student = cfg.get('student') or {}
    n = student.get('steps')
    solver = dict(distill.solver(student), steps=n) if n else dict(steps=cfg['sample_steps'])
    k = cfg['eval_grade_per_class']
    kw = dict(cfg_scale=cfg['cfg_scale'], seed=cfg['seed'], autocast=autocast, **solver)
    return eval_samples(ema, diffusion, meta, cfg['data_dir'], val_data, k, reference, **kw)


def shapes_reference_of(meta, cfg, master):
    """The real val images' factors, read once, where eval samples are graded (rank 0 grades);
    only the built-in shapes data can be: else one line."""
    k = cfg['eval_grade_per_class']
    if k and meta.get('dataset') != 'shapes':
        raise SystemExit(
            f"error: --eval_grade_per_class={k} reads samples back: only the built-in 'shapes' "
            f"data can be ({cfg['data_dir']} is not)"
        )
    return shapes_reference(cfg['data_dir']) if k and master else None


def shared(value, dev):
    """Rank 0's number on every process (only rank 0 samples), so that all agree on keep-best and
    early stopping."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.broadcast(t, 0)
    return t.item()


def evaluate(trained, val_data, shape, reference, autocast, master):
    """The EMA's val loss (on every process: the same EMA and data), the eval grid and its grade
    (rank 0), keep-best, the checkpoints, the log line. -> whether early stopping is due."""
    cfg, run, ema = trained.config, trained.run, trained.ema
    diffusion = trained.task.diffusion
    keep_best, out_dir = cfg['keep_best'], cfg['out_dir']
    vl = eval_loss(ema, trained.task, val_data, shape, autocast, cfg)
    run.best_val = min(run.best_val, vl)
    grid, names, graded = None, None, None
    if master:
        # graded: (accuracy, factor FDs, number graded) or None
        grid, names, graded = sample_grid(
            ema, diffusion, trained.meta, val_data, reference, autocast, cfg
        )
    score = vl
    # lower is better: accuracy is kept as -accuracy; an undefined FD (NaN: a class with < 2
    # readable samples) is never better
    if keep_best != 'val_loss':
        mine = 0.0
        if master:
            mine = graded[1]['overall'] if keep_best == 'shapes_fd' else -graded[0]
        score = shared(mine, val_data.device)
    improved = run.improved(score)
    if master:
        run.history.append((run.step, 'val', vl))
        # the mark goes beside the number best.pt goes by
        mark = {keep_best: ' (best)' if improved else ''}
        line = f"val loss (ema) {vl:.4f}{mark.get('val_loss', '')}"
        if graded:
            acc, fd, n = graded
            log(run.step, val_loss=vl, shapes_accuracy=acc, shapes_fd=fd['overall'])
            line += (
                f" | shapes accuracy {100 * acc:.1f}%{mark.get('shapes_accuracy', '')}, "
                f"factor FD {fd['overall']:.4f}{mark.get('shapes_fd', '')} ({n} samples)"
            )
        else:
            log(run.step, val_loss=vl)
        # keep-best: the EMA weights with the best score so far; written first, so a kill between
        # the two leaves best.pt new and ckpt.pt one evaluation older
        if improved:
            trained.save('best.pt')
        trained.save('ckpt.pt')
        # distillation: each round's student is kept (sample.py --ckpt_name=student2.pt)
        kept = trained.task.round_file(run.step)
        if kept:
            name, what = kept
            trained.save(name)
            line += f" | {what}"
        print(f"step {run.step} | {line} | saved {out_dir}/ckpt.pt", flush=True)
        save_loss_curve(run.history, os.path.join(out_dir, 'loss.png'))
        save_grid(grid, names, os.path.join(out_dir, f'samples_{run.step:06d}.png'))
    stop = bool(cfg['patience'] and run.stale >= cfg['patience'])
    if stop and master:
        best = "none scored"
        if math.isfinite(run.best_score):
            best = f"best {abs(run.best_score):.4f}: {out_dir}/best.pt"
        what = keep_best.replace('_', ' ')
        print(f"early stop: no better {what} in {cfg['patience']} evaluations ({best})")
    return stop


def start_wandb(cfg):
    """Log to Weights & Biases from here on, if wandb is installed (it is not a requirement)."""
    global wandb_run
    try:
        import wandb
    except ImportError:
        print(
            "wandb_project is set but wandb is not installed (pip install wandb): logging to "
            "stdout only"
        )
        return
    # the run's id is kept in its checkpoints' config: a resumed run logs to the same W&B run
    wandb_run = wandb.init(
        project=cfg['wandb_project'], id=cfg['wandb_run_id'] or None, config=cfg, resume='allow'
    )
    cfg['wandb_run_id'] = wandb_run.id


def log(step, **metrics):
    """Numbers to Weights & Biases when it was started; the stdout lines are the log either way."""
    if wandb_run is not None:
        wandb_run.log(metrics, step=step)


def write_trace(folder, prof):
    path = os.path.join(folder, 'trace.json')
    prof.export_chrome_trace(path)
    print(f"wrote profiler trace {path}")


def start_profiler(dev, folder):
    """A torch.profiler trace of steps 2-4 (after a step of warm-up) into folder/trace.json."""
    from torch.profiler import ProfilerActivity, schedule

    activities = [ProfilerActivity.CPU]
    if dev.type == 'cuda':
        activities.append(ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        record_shapes=True,
        on_trace_ready=functools.partial(write_trace, folder),
    )
    prof.start()
    return prof


def duration(seconds):
    """'1h12m', '5m03s' or '42s'."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def log_progress(cfg, run, guard, lr_now, steps, images, dt, flops, peak):
    """The line every log_interval steps: how far the run is, the mean loss of the updates since
    the last line, the LR, img/s, MFU (where the peak is known), and the time left at this rate
    (evaluations not counted); to stdout, and to W&B when it is on."""
    train_loss = guard.mean_loss()
    run.history.append((run.step, 'train', train_loss))
    img_s = images / dt
    log(run.step, train_loss=train_loss, lr=lr_now, img_s=img_s)
    mfu = f" | mfu {100 * flops / dt / peak:.1f}%" if peak else ''
    max_iters = cfg['max_iters']
    eta = duration((max_iters - run.step) * dt / steps)
    done = f"{run.step}/{max_iters} ({100 * run.step / max_iters:.0f}%)"
    line = f"step {done} | loss {train_loss:.4f} | lr {lr_now:.2e} | {img_s:.0f} img/s{mfu}"
    print(f"{line} | eta {eta}", flush=True)


class Progress:
    """A tqdm bar of the run's steps where stdout and stderr are a terminal (rank 0): while it is
    up, print()'s lines go above it (through tqdm.write), so the log lines stay whole. Elsewhere (a
    log file, CI, other ranks) it does nothing."""

    def __init__(self, step, total, master):
        on = master and sys.stdout.isatty() and sys.stderr.isatty()
        self.stdout = sys.stdout
        self.bar = tqdm(total=total, initial=step, unit='step', dynamic_ncols=True, disable=not on)
        if on:
            sys.stdout = DummyTqdmFile(self.stdout)

    def update(self):
        self.bar.update()

    def close(self):
        self.bar.close()
        sys.stdout = self.stdout
