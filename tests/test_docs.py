"""The commands in README.md and RESULTS.md run. Every fenced code block is read, and each command
in it (a line starting with `python `, `pip ` or `torchrun `; a chain joined by `&&` is split) runs
in document order in a copy of the repository's scripts, so a later command reads what an earlier
one wrote (out-shapes/ckpt.pt, data/shapes, ...); each ```python block runs too. They run at a tiny
size: TINY's overrides are appended to a script's command line (a later --key=value wins), so the
test checks that a documented command still works, not the figure it measured. A `pip install` line
is checked, not run: its requirement files exist and its packages are installed.

A command that cannot run here (a GPU, a download, the whole test suite) is in NOT_RUN with the
reason; a command that is neither run nor listed fails the test, so a new one is never skipped
silently, and so does a listed one that the docs no longer have."""

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ('README.md', 'RESULTS.md')
# one command's limit, in seconds (the slowest takes ~30 s on 2 busy cores)
TIMEOUT = 300

# appended to every command of that script: tiny data, a tiny UNet, 2 training steps, a few samples
TINY = {
    'prepare.py': ['--num_train=96', '--num_val=48', '--resolution=16'],
    'train.py': [
        '--max_iters=2',
        '--batch_size=8',
        '--eval_interval=0',
        '--eval_batches=1',
        '--eval_grade_per_class=0',
        '--log_interval=1',
        '--warmup_iters=1',
        '--ema_start=0',
        '--sample_steps=2',
        '--unet_channels=8',
    ],
    'sample.py': [
        '--per_class=1',
        '--grade_per_class=2',
        '--grade_hints=4',
        '--tune_batch=2',
        '--tune_iters=1',
    ],
    'bench.py': [
        '--iters=1',
        '--warmup=1',
        '--batch_size=8',
        '--sample_steps=2',
        '--sample_batch=2',
        '--unet_channels=8',
        '--vae_batch=1',
        '--vae_resolution=64',
    ],
    'bench_samplers.py': [
        '--num_samples=8',
        '--nfes=(5,)',
        '--std_nfe=5',
        '--ref_steps=10',
        '--tune_samples=8',
        '--tune_iters=1',
        '--tune_max_nfe=5',
        '--mixture_samples=8',
        '--mixture_nfes=(5,)',
        '--quality_per_class=2',
        '--quality_nfes=(2,)',
        '--tune_max_steps=0',
        '--shared_train=2',
    ],
    'bench_augment.py': [
        '--num_train=48',
        '--per_class=2',
        # each command trains three runs: their final eval samples 2 steps, not config's 20
        '--train_args=--max_iters=2 --eval_grade_per_class=0 --unet_channels=8 --batch_size=8 '
        '--eval_batches=1 --sample_steps=2',
    ],
    'bench_repa.py': [
        '--max_iters=2',
        '--eval_interval=2',
        '--repa_hidden=16',
        '--dit_args=--arch=dit --patch_size=4 --n_layer=2 --n_embd=32 --n_head=2 --batch_size=8 '
        '--eval_batches=1 --eval_grade_per_class=2 --compile=False --warmup_iters=1',
    ],
}
# appended only where the command sets the key (--num_samples goes with --save_dir)
TINY_IF_SET = {'sample.py': {'num_samples': '2'}}

# RESULTS.md's DiT-XL/2 commands begin so
DIT = 'python sample.py --weights=DiT-XL-2-256x256.pt --out_dir=out-dit'
# the commands that cannot run here, as the docs write them, each with why
NOT_RUN = {
    'python -m pytest -q -n auto': "the whole test suite, which includes this test; CI runs it",
    'python -m pytest -q': "the whole test suite, which includes this test; CI runs it",
    'python -m pytest -q tests/test_sampler.py': "a file of the suite; CI runs it",
    'python -m pytest -q tests/test_distill.py': "a file of the suite; CI runs it",
    'python -m pytest -q tests/test_vae.py': "a file of the suite; CI runs it",
    'python prepare.py --dataset=path/to/afhq/train --resolution=256 '
    '--vae=stabilityai/sd-vae-ft-mse --out_dir=data/faces': (
        "downloads the VAE from the hub, and needs a folder of 256 px faces"
    ),
    'python train.py config/faces.py': "DiT-B/2 on data/faces: the GPU recipe, no data/faces here",
    'python sample.py --out_dir=out-faces': "needs out-faces, the GPU recipe's model",
    'python metrics.py --samples=out-shapes/samples --reference=data/shapes': (
        "downloads facebook/dinov2-base from the hub"
    ),
    'torchrun --standalone --nproc_per_node=8 train.py config/faces.py --batch_size=32': (
        "8 GPUs (NCCL) and the faces data"
    ),
    'python bench.py --suite=True': "the GPU suite: DiT-B/2 and XL/2 at batch 256 on CUDA",
    'python -m pytest -q tests/test_dit_weights.py': "a file of the suite; CI runs it",
    # RESULTS.md, public DiT checkpoints: DiT-XL/2 (675M parameters) and its VAE are downloads
    f'{DIT} --classes=207,360,387,974,88,979,417,279 --per_class=4': (
        "needs DiT-XL-2-256x256.pt (dl.fbaipublicfiles.com) and sd-vae-ft-ema (the hub): a GPU"
    ),
    f'{DIT} --cfg_scale=1.5 --save_dir=out-dit/samples --num_samples=50000 --npz=True': (
        "50,000 DiT-XL/2 samples: a GPU and the downloads above"
    ),
    f'{DIT} --cfg_scale=1.5 --sampler=ddpm --steps=250 --spacing=linspace --save_dir=out-dit/ddpm '
    '--num_samples=50000 --npz=True': "50,000 DiT-XL/2 samples of 250 steps: a GPU and downloads",
    'python guided-diffusion/evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz '
    'out-dit/samples.npz': "ADM's evaluator: a clone, TensorFlow, its reference batch, samples",
    'python prepare.py --dataset=path/to/imagenet/train --resolution=256 '
    '--vae=stabilityai/sd-vae-ft-ema --out_dir=data/imagenet': (
        "ImageNet's train folder and the VAE from the hub"
    ),
    'python train.py --init_from=DiT-XL-2-256x256.pt --data_dir=data/imagenet --out_dir=out-dit-ft '
    '--objective=vp --schedule=linear --prediction=eps --lr=1e-5 --max_iters=2000': (
        "fine-tunes DiT-XL/2 on data/imagenet: a GPU and downloads"
    ),
    'python checkpoint.py out-dit-ft/ckpt.pt --to=diffusers out-dit-ft/diffusers': (
        "needs out-dit-ft, the GPU fine-tune's checkpoint"
    ),
    'python serve.py --out_dir=out-shapes': (
        "a server that runs until stopped: tests/test_serve.py starts it on tiny models and sends "
        "the README's curl line"
    ),
}

# a fence line: ``` or ```lang
FENCE = re.compile(r'^```(\w*)$')


def blocks(doc):
    """The fenced blocks of a markdown file: (language, line number of the first line, lines)."""
    out, lang, start, lines = [], None, 0, []
    with open(os.path.join(ROOT, doc)) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip('\n')
            m = FENCE.match(line.rstrip())
            if lang is None and m:
                lang, start, lines = m.group(1), n + 1, []
            elif lang is not None and line.rstrip() == '```':
                out.append((lang, start, lines))
                lang = None
            elif lang is not None:
                lines.append(line)
    assert lang is None, f"{doc}: the fenced block opened at line {start - 1} is never closed"
    return out


def commands(doc):
    """(where, kind, text) in document order: kind 'cmd' is one command as the doc writes it (a
    chain split at &&, a trailing # comment dropped), 'python' a ```python block (its source)."""
    out = []
    for lang, start, lines in blocks(doc):
        if lang == 'python':
            out.append((f"{doc}:{start}", 'python', '\n'.join(lines)))
            continue
        for i, line in enumerate(lines):
            if not line.startswith(('python ', 'pip ', 'torchrun ')):
                continue
            line = re.sub(r'\s+#\s.*$', '', line)
            for part in re.split(r'\s+&&\s+', line.strip()):
                out.append((f"{doc}:{start + i}", 'cmd', part))
    return out


def all_commands():
    return [c for doc in DOCS for c in commands(doc)]


def test_every_command_is_run_or_listed():
    """Each command is one the runner knows (pip, torchrun, or python on a script of the
    repository) or is in NOT_RUN; NOT_RUN has no command the docs lost, nor a missing test file."""
    found = set()
    for where, kind, text in all_commands():
        if kind == 'python':
            continue
        found.add(text)
        argv = shlex.split(text)
        assert argv[0] in ('python', 'pip', 'torchrun'), f"{where}: `{text}`"
        if argv[0] == 'python' and text not in NOT_RUN:
            assert os.path.isfile(os.path.join(ROOT, argv[1])), (
                f"{where}: `{text}` runs {argv[1]}, which is not a script of the repository"
            )
    stale = sorted(set(NOT_RUN) - found)
    assert not stale, f"NOT_RUN lists commands no document has any more: {stale}"
    for text in NOT_RUN:
        for arg in shlex.split(text):
            assert not arg.startswith('tests/') or os.path.isfile(os.path.join(ROOT, arg)), text


def config_value(args, key, default):
    """What a train.py command line sets `key` to: its config files, then its --key=value."""
    value = default
    for arg in args:
        # a config file (a missing one: the command itself says so)
        if not arg.startswith('--') and os.path.isfile(os.path.join(ROOT, arg)):
            scope = {}
            exec(open(os.path.join(ROOT, arg)).read(), scope)
            value = scope.get(key, value)
        elif arg.startswith(f'--{key}='):
            value = ast.literal_eval(arg.split('=', 1)[1])
    return value


def tiny(argv):
    """The command line made tiny: its script's TINY overrides appended; a distillation's rounds of
    one step each."""
    i = next(i for i, a in enumerate(argv) if a.endswith('.py'))
    script, args = argv[i], argv[i + 1 :]
    extra = list(TINY.get(script, []))
    for key, value in TINY_IF_SET.get(script, {}).items():
        if any(a.startswith(f'--{key}=') for a in args):
            extra.append(f'--{key}={value}')
    # distill_iters must sum to max_iters, one entry a round
    rounds = config_value(args, 'distill_steps', ()) if script == 'train.py' else ()
    if rounds:
        extra += [f'--max_iters={len(rounds)}', f'--distill_iters={(1,) * len(rounds)}']
    return argv + extra


def check_pip(where, argv):
    """A pip install line: its requirement files exist, its named packages are installed. A missing
    optional package skips the test (fails it in CI, NANODIFFUSION_REQUIRE_REFS=1)."""
    args = argv[2:]
    files = [b for a, b in zip(args, args[1:]) if a == '-r']
    for name in files:
        assert os.path.isfile(os.path.join(ROOT, name)), f"{where}: no {name}"
    packages = [a for a in args if not a.startswith('-') and a not in files]
    missing = []
    for name in packages:
        try:
            importlib.metadata.distribution(re.split(r'[=<>!~]', name)[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    why = f"{where}: {' '.join(missing)} not installed (`{shlex.join(argv)}`)"
    if missing and os.environ.get('NANODIFFUSION_REQUIRE_REFS') != '1':
        pytest.skip(why)
    assert not missing, why


def make_image_folder(path):
    """The README's `path/to/folder`: two classes of small images, one with a caption."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(('red', 'blue')):
        os.makedirs(os.path.join(path, name))
        for i in range(12):
            x = rng.integers(0, 60, (80, 96, 3), dtype=np.uint8)
            x[20:60, 30:70, 2 * c] = 220
            Image.fromarray(x).save(os.path.join(path, name, f'{i}.png'))
    with open(os.path.join(path, 'red', '0.txt'), 'w') as f:
        f.write('a red square')


def run_python(argv, cwd, env):
    """One `python script.py ...` through conftest's fork server: (exit status, stdout, stderr); a
    run past TIMEOUT is -14, as SIGALRM's."""
    try:
        p = python(argv, cwd, env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return -14, e.stdout, e.stderr
    return p.returncode, p.stdout, p.stderr


def test_documented_commands_run(tmp_path):
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            shutil.copy(os.path.join(ROOT, name), tmp_path)
    shutil.copytree(os.path.join(ROOT, 'config'), tmp_path / 'config')
    # the prompt files; the pictures are not copied (a command may redraw one)
    os.makedirs(tmp_path / 'docs')
    for name in os.listdir(os.path.join(ROOT, 'docs')):
        if name.endswith('.txt'):
            shutil.copy(os.path.join(ROOT, 'docs', name), tmp_path / 'docs')
    make_image_folder(tmp_path / 'path' / 'to' / 'folder')
    # tiny tensors: one thread is as fast, and does not fight the other test worker
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    done, failed, times = set(), [], []
    for where, kind, text in all_commands():
        if text in NOT_RUN or text in done:
            continue
        done.add(text)
        argv = ['python', f"block{len(done)}.py"] if kind == 'python' else shlex.split(text)
        if kind == 'python':
            (tmp_path / argv[1]).write_text(text)
        elif argv[0] == 'pip':
            check_pip(where, argv)
            continue
        else:
            argv = tiny(argv)
        t0 = time.time()
        if argv[0] == 'python':
            rc, out, err = run_python(argv[1:], tmp_path, env)
        else:
            torchrun = [sys.executable, '-m', 'torch.distributed.run']
            p = subprocess.run(
                torchrun + argv[1:],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            rc, out, err = p.returncode, p.stdout, p.stderr
        times.append((time.time() - t0, text.splitlines()[0]))
        if rc != 0:
            tail = '\n'.join((err or out).strip().splitlines()[-15:])
            why = f'timed out ({TIMEOUT} s)' if rc == -14 else f'exited {rc}'
            failed.append(f"{where}: `{text.splitlines()[0]}` {why}:\n{tail}")
    for t, text in sorted(times, reverse=True):
        print(f"{t:5.1f} s  {text}")
    print(f"{len(times)} commands in {sum(t for t, _ in times):.0f} s")
    assert not failed, '\n\n'.join(failed)
