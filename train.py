"""
Train a diffusion model on a dataset made by prepare.py. One process:

    python train.py config/shapes.py --batch_size=32

Many GPUs (DDP), one node or several:

    torchrun --standalone --nproc_per_node=8 train.py config/faces.py

Everything random in a step (data order, noise, t, label and hint dropout) is a function of (seed,
step), so `--init_from=resume` continues exactly the run that stopped, and N processes see the same
global batch as one process with N times the batch size. A control branch (model.py) for a dataset
with hints (prepare.py --hint=...) is fine-tuned on a frozen base checkpoint in the same loop, and
resumed like any run:

    python train.py config/shapes.py --data_dir=data/shapes-mask --init_from=out-shapes/ckpt.pt --out_dir=out-mask
Distillation (distill.py) runs in this loop too, from a teacher checkpoint: python train.py
config/distill_shapes.py
"""

import copy
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from configurator import check, configure
from data import Data, batch_indices, read_meta
import distill
from diffusion import Diffusion
from flops import flops_per_image, guess_peak_flops
from model import build_model, freeze_base, input_shape, model_args_from, setup_device

# -----------------------------------------------------------------------------
# config: defaults here, overridden by config/*.py files and --key=value (see configurator.py)
out_dir = 'out'
data_dir = 'data/shapes'
# 'scratch', 'resume' (from out_dir/ckpt.pt), or a base checkpoint (ckpt.pt, .safetensors) to
# fine-tune a control branch on (dataset with hints): its network, not this run's settings
init_from = 'scratch'
# 'dit' or 'unet' (small conv UNet: learns fastest in pixel space on a CPU)
arch = 'dit'
# DiT: see model.DIT_SIZES for the paper's sizes, e.g. B/2 = 12 layers, 12 heads, 768 wide, patch 2
patch_size = 2
n_layer = 12
# (also the UNet's attention heads)
n_head = 6
n_embd = 384
# DiT: each block's weights used for this many consecutive layers (1 = no sharing)
share_blocks = 1
# recompute each block's activations in backward: less memory, ~30% more compute
grad_checkpoint = False
# UNet
unet_channels = 64
unet_mult = (1, 2, 2)
unet_blocks = 1
# control branch, DiT: base blocks it copies; 0 = half the depth (UNet: the encoder)
control_blocks = 0
# control branch: chance a hint is all zero (empty), so its strength can be scaled
hint_dropout = 0.1
# distil init_from (the teacher) in rounds of student steps (distill.py), e.g. (4, 2, 1);
# a first round of 0 steps, e.g. (0, 4, 2, 1), learns the guidance alone
distill_steps = ()
# each round's training steps, e.g. (1400, 600), summing to max_iters; () = split evenly
distill_iters = ()
# distilling a conditional model: the CFG scales the student learns to take as an input
distill_cfg = (1.0, 6.0)
# the first round's teacher's DDIM steps over the path; 0 = twice the student's; more: closer
distill_teacher_steps = 0
# diffusion
# 'flow' (rectified flow) or 'vp' (DDPM-style)
objective = 'flow'
# vp only: 'linear' or 'cosine'
schedule = 'cosine'
# vp only: 'eps', 'v' or 'x0'
prediction = 'v'
# vp only
num_timesteps = 1000
# condition on the captions when prepare.py pre-encoded them (else on class labels)
use_text = True
# chance a label (caption) is replaced by the null class (empty caption): makes CFG possible
class_dropout = 0.1
# Min-SNR-gamma loss weighting (e.g. 5.0); 0 = plain MSE
min_snr_gamma = 0.0
# 'adamw' or 'adafactor' (transformers' Adafactor: factored second moments, less memory)
optim = 'adamw'
# 'cosine' (warm-up, one decay to min_lr) or 'restarts' (cosine warm restarts, SGDR)
lr_schedule = 'cosine'
# 'restarts': length of each cosine cycle after warm-up
restart_iters = 1000
# optimisation; the global batch is batch_size * gradient_accumulation_steps * number of processes
batch_size = 64
gradient_accumulation_steps = 1
max_iters = 20000
lr = 1e-4
min_lr = 1e-5
warmup_iters = 500
# cosine decay length; 0 = max_iters (distilling: a round's)
lr_decay_iters = 0
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
# 0 = off
grad_clip = 1.0
# stop after this many non-finite gradients in a row (each one skips its update)
max_bad_steps = 10
ema_decay = 0.9999
# EMA copies the weights until this step, then averages (early weights are noise)
ema_start = 1000
# logging, evaluation, checkpoints, samples
log_interval = 50
# val loss + checkpoint + sample grid; 0 = only at the end
eval_interval = 1000
eval_batches = 8
# log to Weights & Biases if set and wandb is installed (it is not a requirement)
wandb_project = ''
# early stopping: stop after this many evaluations without a better keep_best score; 0 = off
patience = 0
# the eval grid's sampler: DPM-Solver++(2M), this many steps, CFG cfg_scale
sample_steps = 20
cfg_scale = 4.0
# shapes data: read back this many eval samples per class (accuracy, factor FD); 0 = off
eval_grade_per_class = 0
# best.pt and patience go by 'val_loss', or by graded samples: 'shapes_fd', 'shapes_accuracy'
keep_best = 'val_loss'
# system
# 'auto', 'cpu', 'cuda', 'cuda:1', ...
device = 'auto'
# 'auto' (bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU), or explicit (CPU bf16 too)
dtype = 'auto'
# torch.compile; used on CUDA only (on CPU it costs more than it saves here)
compile = True
# or 'max-autotune' (slower compile, tuned kernels), 'reduce-overhead' (CUDA graphs)
compile_mode = 'default'
# write a torch.profiler trace of steps 2-4 to out_dir/trace.json (chrome://tracing)
profile = False
# for MFU; 0 = guess from the GPU name (no MFU on CPU)
peak_flops = 0.0
seed = 1337
# all of the above as main() runs with them (recorded in checkpoints); importing train.py has no
# side effects
config = {}
# -----------------------------------------------------------------------------


def check_config():
    """What each setting may be, in one place: a harmful value (a negative clip that climbs the
    loss, an EMA decay above 1 that writes NaNs) stops here with one line, before anything runs."""
    check(
        globals(),
        positive=(
            'batch_size',
            'gradient_accumulation_steps',
            'max_iters',
            'eval_batches',
            'log_interval',
            'sample_steps',
            'max_bad_steps',
            'restart_iters',
            'num_timesteps',
            'patch_size',
            'n_layer',
            'n_head',
            'n_embd',
            'share_blocks',
            'unet_channels',
            'unet_blocks',
        ),
        non_negative=(
            'lr',
            'min_lr',
            'warmup_iters',
            'lr_decay_iters',
            'grad_clip',
            'weight_decay',
            'ema_start',
            'eval_interval',
            'patience',
            'min_snr_gamma',
            'cfg_scale',
            'peak_flops',
            'seed',
            'control_blocks',
        ),
        fraction=('class_dropout', 'ema_decay', 'hint_dropout'),
        choices=dict(
            arch=('dit', 'unet'),
            objective=('flow', 'vp'),
            schedule=('linear', 'cosine'),
            prediction=('eps', 'v', 'x0'),
            optim=('adamw', 'adafactor'),
            lr_schedule=('cosine', 'restarts'),
            dtype=('auto', 'float32', 'bfloat16', 'float16'),
            keep_best=('val_loss', 'shapes_fd', 'shapes_accuracy'),
            compile_mode=(
                'default',
                'reduce-overhead',
                'max-autotune',
                'max-autotune-no-cudagraphs',
            ),
        ),
    )
    if init_from not in ('scratch', 'resume') and not os.path.isfile(init_from):
        sys.exit(
            f"error: --init_from={init_from!r} is not 'scratch', 'resume' or a base checkpoint file"
        )
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        sys.exit(f"error: --beta1={beta1} and --beta2={beta2} must be in [0, 1)")
    if min_lr > lr:
        sys.exit(f"error: --min_lr={min_lr} is above --lr={lr}")
    if not unet_mult or min(unet_mult) < 1:
        sys.exit(
            f"error: --unet_mult={unet_mult} must be positive channel multipliers, e.g. (1, 2, 2)"
        )
    # one sample per class has no spread: no factor FD
    if eval_grade_per_class < 0 or eval_grade_per_class == 1:
        sys.exit(f"error: --eval_grade_per_class={eval_grade_per_class} must be 0 (off) or >= 2")
    if keep_best != 'val_loss' and not eval_grade_per_class:
        sys.exit(
            f"error: --keep_best={keep_best!r} needs graded samples: set --eval_grade_per_class (e.g. 8)"
        )
    distill.check_rounds(
        distill_steps, distill_cfg, init_from, max_iters, distill_teacher_steps, distill_iters
    )


def get_lr(it, iters=0):
    """Linear warm-up, then cosine decay to min_lr over lr_decay_iters, iters (a round's) or
    max_iters; or SGDR."""
    decay_iters = lr_decay_iters or iters or max_iters
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if lr_schedule != 'restarts' and it >= decay_iters:
        return min_lr
    # one cosine's length
    span = restart_iters if lr_schedule == 'restarts' else max(1, decay_iters - warmup_iters)
    ratio = (it - warmup_iters) % span / span
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


def make_optimizer(model, device_type):
    """AdamW or Adafactor on the trainable parameters; weight decay only on matrices (not biases,
    norms, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and 'embed' not in name else no_decay).append(p)
    groups = [
        {'params': decay, 'weight_decay': weight_decay},
        {'params': no_decay, 'weight_decay': 0.0},
    ]
    if optim == 'adamw':
        # fused: one kernel for all parameters, and it can skip a step on the device (found_inf, see
        # the loop)
        return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=True)
    # our LR schedule drives it, so its own relative-step schedule is off
    if optim == 'adafactor':
        from transformers.optimization import Adafactor

        return Adafactor(
            groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False
        )
    raise SystemExit(f"error: optim must be 'adamw' or 'adafactor', got {optim!r}")


def batch_noise(diffusion, step, n, shape, device, gen_seed, latent=False):
    """t, noise, label dropout, (latents) the VAE posterior sample and h-flip, and hint dropout for
    a global batch, from a generator seeded by (seed, step): a pure function of the step, so
    resuming needs no RNG state."""
    g = torch.Generator(device).manual_seed(gen_seed * 1_000_003 + step)
    t = diffusion.sample_t(n, g, device)
    noise = torch.randn((n,) + shape, generator=g, device=device)
    # for CFG: the null class / empty caption
    drop = torch.rand(n, generator=g, device=device) < class_dropout
    eps = torch.randn((n,) + shape, generator=g, device=device) if latent else None
    flip = torch.rand(n, generator=g, device=device) < 0.5 if latent else None
    # drawn after the draws above: they are as before it
    empty = torch.rand(n, generator=g, device=device) < hint_dropout
    # distillation: the student's step, the CFG scale
    u = torch.rand(n, 2, generator=g, device=device, dtype=torch.float64)
    return t, noise, drop, eps, flip, empty, u


@torch.no_grad()
def update_ema(ema, model, step):
    """fp32 EMA of the trained weights (a control run's frozen base stays as loaded); before
    ema_start it just copies them (early weights are not worth averaging)."""
    pairs = [
        (e, p.float()) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad
    ]
    ema_p, model_p = [e for e, _ in pairs], [p for _, p in pairs]
    if step < ema_start:
        torch._foreach_copy_(ema_p, model_p)
    else:
        torch._foreach_lerp_(ema_p, model_p, 1 - ema_decay)


def main():
    check_config()
    # the settings as they are now, as checkpoints record them
    config.update(configure(globals(), []))
    # ---- processes and devices
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev, ptdtype, autocast = setup_device(device, dtype)
    if ddp:
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
        if dev.type == 'cuda':
            dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(dev)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    torch.manual_seed(seed)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    global_batch = batch_size * gradient_accumulation_steps * world

    # ---- data
    meta = read_meta(data_dir)
    # a text model ignores the class labels
    text = use_text and 'text_dim' in meta
    train_data = Data(data_dir, 'train', dev, text)
    # val_fraction=0: no val split
    val_data = Data(data_dir, 'val', dev, text) if meta['splits'].get('val') else train_data
    shape = input_shape(meta)
    num_classes = 0 if text else meta['num_classes']
    if eval_grade_per_class and meta.get('dataset') != 'shapes':
        raise SystemExit(
            f"error: --eval_grade_per_class={eval_grade_per_class} reads samples back: only the "
            f"built-in 'shapes' data can be ({data_dir} is not)"
        )

    # ---- model, EMA, optimiser: from scratch, resumed, or a control branch on a base checkpoint
    # (frozen)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    # one training run per out_dir: a second one would overwrite this one's checkpoints
    if master:
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.lock_out_dir(out_dir)
        checkpoint.remove_stale_temporaries(out_dir)
    resume, path = init_from == 'resume', ckpt_path if init_from == 'resume' else init_from
    # tensors and plain values only
    ckpt = checkpoint.load(path, dev, training=resume) if init_from != 'scratch' else None
    model_args = plain = model_args_from(
        globals(), shape, num_classes, meta['text_dim'] if text else 0
    )
    distilling = bool(distill_steps)
    control = bool(
        ckpt and not distilling and (not resume or ckpt['model_args'].get('hint_channels'))
    )
    # the teacher's network (resumed: the student's), taking the CFG scale as an input if
    # conditional
    if distilling:
        model_args = (
            ckpt['model_args']
            if resume
            else distill.student_args(
                ckpt, path, num_classes or text, distill_steps[0], distill_teacher_steps
            )
        )
    # the checkpoint's network with a branch for the dataset's hints
    if control:
        if not meta.get('hint'):
            raise SystemExit(
                f"error: a control branch on {path} needs hints: {data_dir} has none (prepare.py --hint=...)"
            )
        model_args = dict(
            ckpt['model_args'],
            hint_channels=meta['hint_shape'][0],
            hint_size=meta['hint_shape'][-1],
        )
        if model_args['arch'] == 'dit':
            model_args['control_blocks'] = control_blocks
    # the same data and diffusion (resumed: the same network), or it would silently train something
    # else
    if ckpt:
        now = dict(
            {k: plain.get(k, 0) for k in ('input_size', 'in_channels', 'num_classes', 'text_dim')},
            vae=meta.get('vae'),
            **{k: globals()[k] for k in checkpoint.DIFFUSION_KEYS},
            **(model_args if resume else {}),
        )
        checkpoint.check_same_model(path, ckpt, now)
    diffusion = Diffusion(objective, schedule, prediction, num_timesteps)
    model = build_model(model_args).to(dev)
    # only the branch trains (make_optimizer takes the trainable parameters)
    if control:
        freeze_base(model)
    # the base's (teacher's) EMA weights, and what it lacks: a control branch
    if (control or distilling) and not resume:
        # or a scale input
        checkpoint.load_base(
            model, ckpt, path, 'control.' if control else 'g_embed.', lacks=control
        )
        # the branch starts as a copy of what it copies (ControlNet); a student's scale input at
        # zero
        if control:
            model.init_control_from_base()
    # NHWC: the layout cuDNN's tensor-core convolutions run in
    if model_args['arch'] == 'unet' and dev.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    model.grad_checkpoint = grad_checkpoint
    ema = copy.deepcopy(model).float().requires_grad_(False)
    # the first round's: init_from's
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if distilling else None
    # whether it takes the scale (else: two halves)
    teacher_guided = bool(ckpt and ckpt['model_args'].get('guidance'))
    optimizer = make_optimizer(model, dev.type)
    scaler = torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16)
    step, best_val, bad_steps, stale, history = 0, float('inf'), 0, 0, []
    # best.pt's keep_best score, lower is better: val loss, factor FD or -accuracy
    best_score = float('inf')
    if resume:
        try:
            model.load_state_dict(ckpt['model'])
            ema.load_state_dict(ckpt['ema'])
            optimizer.load_state_dict(ckpt['optimizer'])
            scaler.load_state_dict(ckpt['scaler'])
            if distilling:
                teacher.load_state_dict(ckpt['teacher']['weights'])
                teacher_guided = ckpt['teacher']['guided']
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(
                f"error: {ckpt_path} has weights or optimizer state that do not fit this model "
                f"({(str(e).splitlines() or [''])[0][:160]})"
            ) from None
        step, best_val, bad_steps, stale, history = (
            ckpt[k] for k in ('step', 'best_val', 'bad_steps', 'stale', 'history')
        )
        # best.pt's score (a checkpoint from before keep_best kept best by val loss); another
        # yardstick starts afresh
        same = ckpt['config'].get('keep_best', 'val_loss') == keep_best
        best_score, stale = (ckpt.get('best_score', best_val), stale) if same else (float('inf'), 0)
        if master:
            print(f"resuming from {ckpt_path} at step {step}")
    raw_model = model
    # distilling: the teacher's forwards cost more than the student's: compiled with it
    teacher_net = teacher
    if compile and dev.type == 'cuda':
        model, teacher_net = (
            torch.compile(model, mode=compile_mode),
            teacher and torch.compile(teacher, mode=compile_mode),
        )
    if ddp:
        model = DDP(model, device_ids=[dev.index] if dev.type == 'cuda' else None)
    n_params = sum(p.numel() for p in raw_model.parameters())
    # a control run: its branch's
    n_trained = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    # forward + backward = 3x a forward; distilling, + the teacher's forwards (its steps; CFG's 2
    # halves, or 1)
    calls = lambda r: (
        3 + distilling * subs[r] * (1 + (not (teacher_guided or r) and model_args['guidance']))
    )
    # a forward of the batch
    flops_fwd = flops_per_image(raw_model, shape, meta.get('text_max_len', 0)) * global_batch
    peak = peak_flops or guess_peak_flops(dev)
    if master:
        print(
            f"{n_params / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained) | {len(train_data)} train images {shape} "
            f"| global batch {global_batch} | {dev} {ptdtype} | {world} process(es) | conditioned on "
            f"{'captions' if text else 'class labels'}"
        )

    # distillation: each round's student steps (not distilling: one round)
    rounds = list(distill_steps) or [0]
    # and its teacher's calls per student step
    subs = distill.teacher_substeps(rounds, distill_teacher_steps)
    # the step each round ends at
    ends = distill.round_ends(rounds, max_iters, distill_iters)
    # the round step s is in (resumed at the end: the last)
    round_of = lambda s: sum(s >= e for e in ends[:-1])
    # for sample.py
    record = lambda r: distill.record(diffusion, rounds[r], distill_cfg, model_args['guidance'])
    if distilling:
        config['student'] = record(round_of(step))

    # the training loss, or distillation's (distill.py)
    def loss_of(net, x0, y, t, noise, caps, hint, u, gamma=0.0):
        if not distilling:
            return diffusion.loss(net, x0, y, t, noise, gamma, caps, hint)
        return distill.distill_loss(
            diffusion,
            (net, model_args['guidance']),
            (teacher_net, teacher_guided or r > 0),
            x0,
            y,
            noise,
            t,
            u,
            rounds[r],
            distill_cfg,
            num_classes,
            caps,
            train_data.empty if text else None,
            subs[r],
        )

    @torch.no_grad()
    def val_loss(net):
        losses = []
        for i in range(eval_batches):
            idx = np.arange(i * batch_size, (i + 1) * batch_size) % len(val_data)
            x0, y = val_data.get(idx)
            # the same noise at every evaluation
            t, noise, *_, u = batch_noise(diffusion, i, len(idx), shape, dev, seed + 1)
            caps, hint = (
                val_data.get_text(idx) if text else None,
                val_data.get_hint(idx) if control else None,
            )
            with autocast:
                # a text model has only the null class
                y = y * 0 if text else y
                losses.append(loss_of(net, x0, y, t, noise, caps, hint, u).item())
        return sum(losses) / len(losses)

    # what a checkpoint holds: tensors and plain values only (checkpoint.load refuses anything else)
    def state():
        return {
            'model': raw_model.state_dict(),
            'ema': ema.state_dict(),
            'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(),
            'step': step,
            'best_val': best_val,
            'bad_steps': bad_steps,
            'stale': stale,
            'history': history,
            'best_score': best_score,
            'model_args': model_args,
            'config': config,
            'meta': meta,
            **(
                {'teacher': {'weights': teacher.state_dict(), 'guided': teacher_guided}}
                if distilling
                else {}
            ),
        }

    def save(name='ckpt.pt'):
        checkpoint.save(state(), os.path.join(out_dir, name))

    # the real val images' factors, read once, if samples are graded (rank 0 grades)
    reference = None
    if eval_grade_per_class and master:
        from sample import shapes_reference

        reference = shapes_reference(data_dir)

    # the EMA's eval grid, and its shapes grade if asked (sample.eval_samples)
    def eval_samples():
        # lazy: only the master samples
        from sample import eval_samples

        # a step student: DDIM on its grid
        student = config.get('student') or {}
        n = student.get('steps')
        solver = dict(distill.solver(student), steps=n) if n else dict(steps=sample_steps)
        return eval_samples(
            ema,
            diffusion,
            meta,
            data_dir,
            val_data,
            eval_grade_per_class,
            reference,
            cfg_scale=cfg_scale,
            seed=seed,
            autocast=autocast,
            **solver,
        )

    # rank 0's number on every process (only rank 0 samples): all agree on keep-best, early stopping
    def shared(value):
        if not ddp:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=dev)
        dist.broadcast(t, 0)
        return t.item()

    # wandb, if asked for and installed; otherwise the stdout lines are the log
    log = lambda **kw: None
    if wandb_project and master:
        try:
            import wandb

            wandb.init(project=wandb_project, config=config, resume='allow')
            log = lambda **kw: wandb.log(kw, step=step)
        except ImportError:
            print(
                "wandb_project is set but wandb is not installed (pip install wandb): logging to stdout only"
            )

    prof = None
    if profile and master:
        from torch.profiler import ProfilerActivity, schedule as prof_schedule

        trace = os.path.join(out_dir, 'trace.json')
        prof = torch.profiler.profile(
            activities=[ProfilerActivity.CPU]
            + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else []),
            schedule=prof_schedule(wait=1, warmup=1, active=3, repeat=1),
            record_shapes=True,
            on_trace_ready=lambda p: (
                p.export_chrome_trace(trace),
                print(f"wrote profiler trace {trace}"),
            ),
        )
        prof.start()

    # ---- the loop
    t_last, steps_since, loss_sum = time.time(), 0, torch.zeros((), device=dev)
    # device-side counts
    n_loss, bad_run, bad_max, bad_new = (
        torch.zeros((), dtype=torch.long, device=dev) for _ in range(4)
    )
    while step < max_iters:
        # the round (distillation: each has its own LR schedule and EMA start)
        r = round_of(step)
        local, length = step - ([0] + ends)[r], ends[r] - ([0] + ends)[r]
        # a new round: its teacher and its student start as the last round's student
        if distilling and local == 0 and r:
            teacher.load_state_dict(ema.state_dict())
            raw_model.load_state_dict(ema.state_dict())
            # best.pt: this round's best student
            best_score, stale = float('inf'), 0
            config['student'] = record(r)
        for group in optimizer.param_groups:
            group['lr'] = get_lr(local, length)
        idx = batch_indices(step, len(train_data), global_batch, seed)
        t, noise, drop, eps, flip, empty, u = batch_noise(
            diffusion, step, global_batch, shape, dev, seed, train_data.latent
        )
        step_loss = torch.zeros((), device=dev)
        try:
            for micro in range(gradient_accumulation_steps):
                # this process's slice of the global batch (the same examples with the same noise
                # whatever the world size)
                s = slice(
                    (micro * world + rank) * batch_size, (micro * world + rank + 1) * batch_size
                )
                # latents: mirrored or not (the hint with them)
                f = flip[s] if flip is not None else None
                x0, y = train_data.get(idx[s], eps[s] if eps is not None else None, f)
                # the null class, for CFG (text: the only class)
                y = y * 0 if text else torch.where(drop[s], num_classes, y)
                # dropped: the empty caption
                caps = train_data.get_text(idx[s], drop[s]) if text else None
                # dropped: zeros
                hint = (
                    train_data.get_hint(idx[s], f) * ~empty[s].view(-1, 1, 1, 1)
                    if control
                    else None
                )
                last = micro == gradient_accumulation_steps - 1
                with model.no_sync() if ddp and not last else nullcontext(), autocast:
                    loss = (
                        loss_of(model, x0, y, t[s], noise[s], caps, hint, u[s], min_snr_gamma)
                        / gradient_accumulation_steps
                    )
                scaler.scale(loss).backward()
                step_loss += loss.detach()
        except torch.OutOfMemoryError:
            raise SystemExit(
                f"error: CUDA out of memory at batch_size={batch_size}: lower batch_size (raise "
                f"gradient_accumulation_steps to keep the global batch), set grad_checkpoint=True, "
                f"or use a smaller model"
            ) from None
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
        # A non-finite gradient (a corrupt example, an overflow) would poison the weights and Adam's
        # moments for good: that
        # update is skipped on the device (fused AdamW's found_inf, GradScaler's own mechanism,
        # which fp16 uses), so no step
        # waits for the host; the skips are counted on the device and read at log time (Adafactor:
        # one host sync a step).
        # fp16: GradScaler's overflow skips are its normal life
        ok = torch.isfinite(grad_norm) | (ptdtype == torch.float16)
        # (fp16: GradScaler sets it itself)
        optimizer.found_inf = (~ok).float()
        if optim == 'adamw' or ok.item():
            scaler.step(optimizer)
            scaler.update()
            # a skipped step left the weights as they were: the EMA moves towards them
            update_ema(ema, raw_model, local)
        # non-finite gradients in a row, on the device
        bad_run = (bad_run + 1) * ~ok
        bad_max, bad_new = torch.maximum(bad_max, bad_run), bad_new + ~ok
        loss_sum, n_loss = loss_sum + torch.where(ok, step_loss, 0.0), n_loss + ok
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_since += 1
        if prof is not None:
            prof.step()

        # and each round's end
        evaluating = (eval_interval and step % eval_interval == 0) or step in ends
        # every process: all read the same (all-reduced) gradients' skips
        if step % log_interval == 0 or evaluating:
            skipped, longest = bad_new.item(), bad_max.item()
            bad_steps += skipped
            if skipped and master:
                print(
                    f"step {step} | {skipped} non-finite gradient(s) since the last log: update(s) skipped "
                    f"({bad_steps} skipped so far)",
                    flush=True,
                )
            if longest >= max_bad_steps:
                raise SystemExit(
                    f"error: {longest} non-finite gradients in a row by step {step}: lower lr, check the "
                    f"data, or resume from the last checkpoint ({ckpt_path})"
                )
            bad_max.zero_(), bad_new.zero_()
        if master and (step % log_interval == 0 or step == max_iters):
            dt = time.time() - t_last
            img_s = steps_since * global_batch / dt
            # N GPUs: N peaks
            mfu = (
                f" | mfu {100 * flops_fwd * calls(r) * steps_since / dt / (peak * world):.1f}%"
                if peak
                else ''
            )
            train_loss = loss_sum.item() / max(n_loss.item(), 1)
            history.append((step, 'train', train_loss))
            log(train_loss=train_loss, lr=get_lr(local, length), img_s=img_s)
            print(
                f"step {step} | loss {train_loss:.4f} | lr {get_lr(local, length):.2e} | {img_s:.0f} img/s{mfu}",
                flush=True,
            )
            loss_sum, n_loss, steps_since, t_last = loss_sum * 0, n_loss * 0, 0, time.time()
        if evaluating:
            # on every process (same EMA, same data), so all agree on early stopping
            vl = val_loss(ema)
            best_val = min(best_val, vl)
            # graded: (accuracy, FD, n) or None
            grid, names, graded = eval_samples() if master else (None, None, None)
            if keep_best == 'val_loss':
                score = vl
            # an undefined FD (NaN: a class with < 2 readable samples) is never better
            else:
                score = shared(
                    (graded[1]['overall'] if keep_best == 'shapes_fd' else -graded[0])
                    if master
                    else 0.0
                )
            improved = score < best_score
            # accuracy is kept as -accuracy
            best_score, stale = (score, 0) if improved else (best_score, stale + 1)
            if master:
                history.append((step, 'val', vl))
                # beside the number best.pt goes by
                mark = {keep_best: ' (best)' if improved else ''}
                line = f"val loss (ema) {vl:.4f}{mark.get('val_loss', '')}"
                if graded:
                    acc, fd, n = graded
                    log(val_loss=vl, shapes_accuracy=acc, shapes_fd=fd['overall'])
                    line += (
                        f" | shapes accuracy {100 * acc:.1f}%{mark.get('shapes_accuracy', '')}, factor FD "
                        f"{fd['overall']:.4f}{mark.get('shapes_fd', '')} ({n} samples)"
                    )
                else:
                    log(val_loss=vl)
                # keep-best: the EMA weights with the best score so far; written first, so
                if improved:
                    # a kill between the two leaves best.pt new and ckpt.pt one evaluation older
                    save('best.pt')
                save()
                # each round's student is kept (sample.py --ckpt_name=student2.pt)
                if distilling and step in ends:
                    save(f"student{rounds[r]}.pt" if rounds[r] else 'student_guided.pt')
                    line += f" | {f'{rounds[r]}-step' if rounds[r] else 'guidance'} student"
                print(f"step {step} | {line} | saved {out_dir}/ckpt.pt", flush=True)
                from sample import save_grid, save_loss_curve

                save_loss_curve(history, os.path.join(out_dir, 'loss.png'))
                save_grid(grid, names, os.path.join(out_dir, f'samples_{step:06d}.png'))
            # do not count evaluation in img/s
            t_last = time.time()
            if patience and stale >= patience:
                if master:
                    best = (
                        f"best {abs(best_score):.4f}: {out_dir}/best.pt"
                        if math.isfinite(best_score)
                        else "none scored"
                    )
                    print(
                        f"early stop: no better {keep_best.replace('_', ' ')} in {patience} evaluations ({best})"
                    )
                break
    if prof is not None:
        prof.stop()
    # the shareable file: EMA weights + settings as JSON metadata, no optimizer, no pickle
    if master:
        checkpoint.export_safetensors(state(), os.path.join(out_dir, 'model.safetensors'))
        print(f"exported the EMA weights to {out_dir}/model.safetensors")
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    # config files and --key=value overrides on the command line
    configure(globals())
    main()
