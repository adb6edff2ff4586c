"""
The GPU suite, `python bench.py --suite=True`: every figure of BENCHMARKS.md from one command, each
run in its own process (a clean memory count; an out-of-memory stays in its row), the table
rewritten after each run, so that a suite cut short still publishes what it measured.
"""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

from flops import guess_peak_flops

# 256 px images are 32x32x4 SD-VAE latents, 1000 classes
B256 = ' --resolution=32 --channels=4 --num_classes=1000 --batch_size=256 --sample_steps=0'
SUITE = [
    ('DiT-B/2', 'bench.py --size=B/2' + B256),
    (
        'DiT-B/2, grad checkpointing',
        'bench.py --size=B/2 --grad_checkpoint=True --peer=False' + B256,
    ),
    ('DiT-XL/2', 'bench.py --size=XL/2 --peer=False' + B256),
    ('DiT-XL/2, grad checkpointing', 'bench.py --size=XL/2 --grad_checkpoint=True' + B256),
    ('UNet demo', 'bench.py config/shapes.py --sample_steps=0'),
    # sampling the official DiT-XL/2 256 network (random weights): UniPC-3, 20 steps, CFG 4
    (
        'DiT-XL/2 official (learned variance), sampling',
        'bench.py --size=XL/2 --learn_sigma=True --objective=vp --schedule=linear --prediction=eps'
        ' --peer=False --resolution=32 --channels=4 --num_classes=1000 --batch_size=8 --warmup=1'
        ' --iters=2 --sample_steps=20 --sample_batch=64',
    ),
    # train.py's own img/s and MFU: DiT-B/2 on random latents in prepare.py's format (write_latents)
    (
        'train.py, DiT-B/2',
        'train.py --data_dir=data/bench_latents --out_dir=data/bench_latents/out --n_layer=12'
        ' --n_head=12 --n_embd=768 --patch_size=2 --batch_size=256 --log_interval=20'
        ' --eval_interval=0',
    ),
]
COLUMNS = [
    'train img/s',
    'MFU',
    'peak memory',
    'diffusers train img/s',
    'diffusers MFU',
    'ours / diffusers',
    'sample img/s (20 steps, cfg)',
]
BEGIN, END = '<!-- bench.py --suite writes from here -->', '<!-- to here -->'
HERE = os.path.dirname(os.path.abspath(__file__))


def write_latents(folder, n=1024, shape=(4, 32, 32), classes=1000):
    """A latent dataset in prepare.py's format holding random numbers, for train.py's img/s where no
    VAE can be downloaded: its speed is real (the same arrays, shapes and loader), but it has no VAE
    to decode samples with, so train.py must be stopped before it evaluates (measure does)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    # (image, flipped) x (posterior mean, std)
    latents = np.full((n, 2, 2, *shape), 0.1, np.float16)
    latents[:, :, 0] = rng.standard_normal((n, 2, *shape))
    np.save(os.path.join(folder, 'train_latents.npy'), latents)
    np.save(os.path.join(folder, 'train_y.npy'), rng.integers(0, classes, n))
    # no val split: train.py validates on train then
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump(
            dict(
                dataset='random latents (bench.py --suite)',
                kind='latents',
                latent_shape=list(shape),
                vae='none',
                num_classes=classes,
                class_names=[str(i) for i in range(classes)],
                splits=dict(train=n, val=0),
            ),
            f,
        )


def measure(cmd, lines=4):
    """Run `python cmd` -> {column: value}: bench.py's printed table; or train.py's img/s and MFU,
    the mean of its log lines after the first (which holds compilation), and it is stopped there,
    before it evaluates."""
    out, logs = [], []
    with subprocess.Popen(
        [sys.executable] + cmd.split(),
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as p:
        for line in p.stdout:
            out.append(line.strip())
            # train.py's log line
            logs += re.findall(r'\| (\d+) img/s(?: \| mfu ([\d.]+)%)?', out[-1])
            if len(logs) == lines:
                p.kill()
                img_s, mfu = zip(*logs[1:])
                return {
                    'train img/s': f"{np.mean([float(r) for r in img_s]):.1f}",
                    'MFU': f"{np.mean([float(m) for m in mfu]):.1f}%" if all(mfu) else 'n/a',
                }
    if p.returncode:
        return {'error': next((s for s in reversed(out) if s), '?')[:150]}
    return dict(re.split(r'\s{2,}', s, maxsplit=1) for s in out if re.search(r'\S\s{2,}\S', s))


def publish(path, head, results):
    """Rewrite the text of path between BEGIN and END (appended if absent; the rest is kept) as head
    and one table of results [(label, command, {column: value})]."""
    table = ['| run | ' + ' | '.join(COLUMNS) + ' | command |', '|---' * (len(COLUMNS) + 2) + '|']
    for label, cmd, rows in results:
        # '41.0% of 989 TFLOP/s' -> '41.0%'
        cells = [rows.get(c, '—').split(' of ')[0] for c in COLUMNS]
        if 'error' in rows:
            cells = [rows['error']] + [''] * (len(COLUMNS) - 1)
        table.append(f"| {label} | {' | '.join(cells)} | `python {cmd}` |")
    before, _, rest = (open(path).read() if os.path.exists(path) else '').partition(BEGIN)
    with open(path + '.tmp', 'w') as f:
        f.write(
            f"{before}{BEGIN}\n{head}\n\n"
            + '\n'.join(table)
            + f"\n{END}"
            + (rest.partition(END)[2] or '\n')
        )
    os.replace(path + '.tmp', path)


def run_suite(extra='', path=os.path.join(HERE, 'BENCHMARKS.md')):
    """Every SUITE run (bench.py with extra arguments), its row of path's table rewritten after
    each, so that a suite cut short still publishes what it measured."""
    if not os.path.exists(os.path.join(HERE, 'data/shapes/meta.json')):
        # the UNet demo's data: generated
        subprocess.run([sys.executable, 'prepare.py'], cwd=HERE, check=True)
    write_latents(os.path.join(HERE, 'data/bench_latents'))
    commit = subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE, capture_output=True, text=True
    ).stdout
    head = (
        f"Measured by `python bench.py --suite=True` on {torch.cuda.get_device_name()} (MFU of "
        f"{guess_peak_flops(torch.device('cuda')) / 1e12:.0f} TFLOP/s), torch "
        f"{torch.__version__}, commit "
        f"{commit.strip() or '?'}, {time.strftime('%Y-%m-%d')}."
    )
    results = []
    for label, cmd in SUITE:
        cmd += extra if cmd.startswith('bench.py') else ''
        print(f"{label}: python {cmd}", flush=True)
        results.append((label, cmd, measure(cmd)))
        print(f"  {results[-1][2]}", flush=True)
        publish(path, head, results)
    print(f"wrote {path}")
