"""
Train a diffusion model on a dataset made by prepare.py, in one process or many (DDP, torchrun).

    python train.py config/shapes.py --batch_size=32
    torchrun --standalone --nproc_per_node=8 train.py config/faces.py

Everything random in a step (data order, noise, t, label and hint dropout) is a function of (seed,
step), so `--init_from=resume` continues exactly the run that stopped, and N processes see the same
global batch as one process with N times the batch size. A control branch (model.py) for a dataset
with hints (prepare.py --hint=...) is fine-tuned on a frozen base checkpoint in the same loop;
distillation (distill.py) is another objective of it, from a teacher checkpoint:

    python train.py config/shapes.py --data_dir=data/shapes-mask --out_dir=out-mask \
        --init_from=out-shapes/ckpt.pt
    python train.py config/distill_shapes.py

Read top to bottom: the settings, the LR schedule, the EMA, the training step, the choice of
objective (diffusion.Denoise or distill.Distill), then main(): the set-up, then the loop, which
knows one thing: a step. The optimiser and its guarded update are in optim.py, evaluation and
keep-best in evaluate.py, what a run starts from and saves in checkpoint.py.
"""

import copy
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import evaluate
from optim import Guard, make_optimizer
from configurator import check, configure, resume
from augment import parse as parse_augment
from data import Data, batch_indices, draw, read_meta
import distill
import repa
from images import load_vae
import dit_weights
from diffusion import Denoise, Diffusion
from flops import flops_per_image, guess_peak_flops
from model import input_shape, setup_device

# -----------------------------------------------------------------------------
# config: defaults here, overridden by config/*.py files and --key=value (see configurator.py)

out_dir = 'out'
data_dir = 'data/shapes'
# 'scratch', 'resume' (from out_dir/ckpt.pt), or a base checkpoint (ckpt.pt, .safetensors) to
# fine-tune a control branch on (dataset with hints): its network, not this run's settings; or a
# public DiT to fine-tune (dit_weights.py: an official .pt, a diffusers folder or hub id)
init_from = 'scratch'
# 'dit' or 'unet' (small conv UNet: learns fastest in pixel space on a CPU)
arch = 'dit'
# DiT: see model.DIT_SIZES for the paper's sizes, e.g. B/2 = 12 layers, 12 heads, 768 wide, patch 2
patch_size = 2
n_layer = 12
# DiT heads; a UNet uses the most <= n_head that divide its lowest level's width
n_head = 6
n_embd = 384
# DiT timestep frequencies 10000^(-k / (128 - freq_shift)): 0 the paper's; 1 diffusers' DiT, whose
# export (checkpoint.py --to=diffusers) then computes exactly what ours does
freq_shift = 0
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
# clear the optimiser's moments (and AdamW's step count) at each later round's start instead of
# carrying them from the last round's student (resume stays exact: a round begins at the same step
# whether or not the run was resumed there). Off: on the demo the 1-step student graded 92.7% with
# carried moments with both seeds, 92.2% and 92.0% with reset ones (RESULTS.md, distillation)
distill_reset_optim = False
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
# pixel data: mirror each training image (and its hint) left-right with chance 1/2; latent data
# always is (prepare.py stores each image's mirror's encoding too)
random_flip = False
# EDM's non-leaking augmentation (augment.py), e.g. 'rotate:0.5,hue:0.5': transform:probability
# [:strength], each applied per example; the network is told what was applied and is sampled
# with 'nothing', so it draws clean images. '' = off
augment = ''
# False: the network is not told (the leak control: it learns to draw augmented images)
augment_cond = True
# REPA (repa.py), DiT only: align the tokens after block repa_depth with a frozen transformers
# vision encoder's patch features (hub id or folder, e.g. facebook/dinov2-base); '' = off
repa_encoder = ''
repa_depth = 4
# the alignment term's weight and the projector MLP's width (the paper's 0.5 and 2048)
repa_weight = 0.5
repa_hidden = 2048
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
# set by the run that starts logging (recorded in its checkpoints): a resumed run continues it
wandb_run_id = ''
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
# dtype 'auto' on a CPU with bf16 instructions (AVX-512 BF16, AMX): bf16 autocast, not fp32
cpu_bf16 = False
# torch.compile; used on CUDA only (on CPU it costs more than it saves here)
compile = True
# or 'max-autotune' (slower compile, tuned kernels), 'reduce-overhead' (CUDA graphs)
compile_mode = 'default'
# write a torch.profiler trace of steps 2-4 to out_dir/trace.json (chrome://tracing)
profile = False
# for MFU; 0 = guess from the GPU name (no MFU on CPU)
peak_flops = 0.0
seed = 1337
# resume with settings that differ from the run's own (configurator.resume names them)
force = False
# all of the above as main() runs with them (recorded in checkpoints); importing train.py has no
# side effects
config = {}
# -----------------------------------------------------------------------------


def check_config():
    """What each setting may be, in one place: a harmful value (a negative clip that climbs the
    loss, an EMA decay above 1 that writes NaNs) stops here with one line, before anything runs."""
    positive = (
        'batch_size gradient_accumulation_steps max_iters eval_batches log_interval sample_steps '
        'max_bad_steps restart_iters num_timesteps patch_size n_layer n_head n_embd share_blocks '
        'unet_channels unet_blocks'
    )
    non_negative = (
        'lr min_lr warmup_iters lr_decay_iters grad_clip weight_decay ema_start eval_interval '
        'patience min_snr_gamma cfg_scale peak_flops seed control_blocks'
    )
    compile_modes = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
    check(
        globals(),
        positive=positive.split(),
        non_negative=non_negative.split(),
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
            compile_mode=compile_modes,
        ),
    )
    if init_from not in ('scratch', 'resume') and not dit_weights.found(init_from):
        sys.exit(
            f"error: --init_from={init_from!r} is not 'scratch', 'resume', a checkpoint file, or "
            "a diffusers DiT folder or hub id"
        )
    if repa_encoder and (arch != 'dit' or distill_steps or not 1 <= repa_depth <= n_layer):
        sys.exit(
            f"error: --repa_encoder: REPA trains a DiT's plain objective, at a block 1.."
            f"{n_layer} (--repa_depth={repa_depth}, --arch={arch!r}, no distillation)"
        )
    if augment and (distill_steps or init_from not in ('scratch', 'resume')):
        sys.exit(
            "error: --augment trains from scratch (the network takes what was applied as an "
            "input): not with distillation or a base checkpoint"
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
            f"error: --keep_best={keep_best!r} needs graded samples: "
            "set --eval_grade_per_class (e.g. 8)"
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


def micro_batches(rank, world):
    """This process's slices of the global batch, one per micro-step: the same examples with the
    same draws whatever the world size (N processes see what one sees with N times the batch)."""
    firsts = [(micro * world + rank) * batch_size for micro in range(gradient_accumulation_steps)]
    return [slice(first, first + batch_size) for first in firsts]


def train_step(model, task, data, idx, draws, slices, guard, optimizer, scaler, autocast):
    """One optimiser step on a global batch (idx, draws): the forward and backward of each of this
    process's micro-batches (slices), gradients accumulated (DDP: all-reduced on the last), then
    the guarded update. -> whether the optimiser stepped (optim.Guard.step)."""
    step_loss = torch.zeros((), device=data.device)
    for s in slices:
        part = draws.part(s)
        batch = data.batch(idx[s], part)
        # DDP: all-reduce the gradients on the last micro-batch only
        last = s == slices[-1]
        sync = nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        with sync, autocast:
            loss = task.loss(model, batch, part) / len(slices)
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    return guard.step(model, optimizer, scaler, step_loss)


def objective_for(diffusion, model, model_args, ckpt, num_classes, train_data, dev):
    """The objective trained: the plain one, or distillation of the checkpoint (the teacher)."""
    if not distill_steps and repa_encoder:
        vae = load_vae(read_meta(data_dir), dev) if train_data.latent else None
        return repa.wrap(Denoise(diffusion, min_snr_gamma, max_iters), model, config, vae, dev)
    if not distill_steps:
        return Denoise(diffusion, min_snr_gamma, max_iters)
    null_text = train_data.empty if train_data.text else None
    compiled = compile_mode if compile and dev.type == 'cuda' else None
    return distill.Distill(
        diffusion, model, model_args, ckpt, config, num_classes, null_text, compiled
    )


def main():
    check_config()
    # the settings as they are now, as checkpoints record them
    config.update(configure(globals(), []))

    # processes and devices: one, or one of torchrun's (DDP)
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev, ptdtype, autocast = setup_device(device, dtype, cpu_bf16)
    if ddp:
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
        if dev.type == 'cuda':
            dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(dev)
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    master = rank == 0
    torch.manual_seed(seed)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    global_batch = batch_size * gradient_accumulation_steps * world

    # data; a text model ignores the class labels: its only class is the null one
    meta = read_meta(data_dir)
    text = use_text and 'text_dim' in meta
    shape = input_shape(meta)
    num_classes = 0 if text else meta['num_classes']
    train_data = Data(data_dir, 'train', dev, text)
    val_data = train_data
    if meta['splits'].get('val'):
        val_data = Data(data_dir, 'val', dev, text)
    # the real val images' factors, read once, if samples are graded (rank 0 grades)
    reference = evaluate.shapes_reference_of(meta, config, master)
    # one training run per out_dir: a second one would overwrite this one's checkpoints
    if master:
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.lock_out_dir(out_dir)
        checkpoint.remove_stale_temporaries(out_dir)

    # the model, its EMA, the objective, the optimiser: from scratch, resumed, or on a checkpoint
    text_dim = meta['text_dim'] if text else 0
    ckpt, path, model_args = checkpoint.starting_point(
        config, meta, shape, num_classes, text_dim, dev
    )
    # a control run's batches carry the hints
    train_data.hints = val_data.hints = bool(model_args.get('hint_channels'))
    diffusion = Diffusion(objective, schedule, prediction, num_timesteps)
    model = checkpoint.build(config, model_args, ckpt, path, dev)
    ema = copy.deepcopy(model).float().requires_grad_(False)
    task = objective_for(diffusion, model, model_args, ckpt, num_classes, train_data, dev)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16)
    run = checkpoint.Run()
    if init_from == 'resume':
        checkpoint.restore(ckpt, path, model, ema, optimizer, scaler, task)
        run = checkpoint.Run.resumed(ckpt, keep_best)
        if master:
            print(f"resuming from {path} at step {run.step}")
    trained = checkpoint.Trained(model, ema, optimizer, scaler, task, run, model_args, meta, config)
    raw_model = model
    if compile and dev.type == 'cuda':
        model = torch.compile(model, mode=compile_mode)
    if ddp:
        model = DDP(model, device_ids=[dev.index] if dev.type == 'cuda' else None)
    # distillation: what sample.py needs to sample the student, kept in the checkpoint's config
    config.update(task.config(run.step))

    # what the log reports: MFU from a forward's FLOPs of the global batch and the peak
    flops_fwd = flops_per_image(raw_model, shape, meta.get('text_max_len', 0)) * global_batch
    peak = peak_flops or guess_peak_flops(dev)
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        n_trained = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        cond = 'captions' if text else 'class labels'
        print(
            f"{n_params / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained) | "
            f"{len(train_data)} train images {shape} | global batch {global_batch} | {dev} "
            f"{ptdtype} | {world} process(es) | conditioned on {cond}"
        )
    if wandb_project and master:
        evaluate.start_wandb(config)
    prof = evaluate.start_profiler(dev, out_dir) if profile and master else None

    # the loop
    guard = Guard(dev, ptdtype == torch.float16, config)
    slices = micro_batches(rank, world)
    latent = train_data.latent
    rates = dict(class_dropout=class_dropout, hint_dropout=hint_dropout, flip_pixels=random_flip)
    # augmentation: drawn with the step's draws, applied where the batch is assembled
    train_data.augment = rates['augment_spec'] = parse_augment(augment, train_data.latent)
    train_data.augment_cond = augment_cond
    t_last = time.time()
    steps_since = 0
    bar = evaluate.Progress(run.step, max_iters, master)
    while run.step < max_iters:
        # a new distillation round: the last round's student is the teacher and the student,
        # and best.pt is this round's best
        if task.begin(run.step, raw_model, ema):
            run.restart_best()
            config.update(task.config(run.step))
            # a new target from a new teacher: the last round's moments, optionally, forgotten
            if distill_reset_optim:
                optimizer.state.clear()
        # the LR schedule and the EMA's start run over the round (a plain run: one round)
        start, end = task.span(run.step)
        lr_now = get_lr(run.step - start, end - start)
        for group in optimizer.param_groups:
            group['lr'] = lr_now
        idx = batch_indices(run.step, len(train_data), global_batch, seed)
        draws = draw(diffusion, run.step, global_batch, shape, dev, seed, latent, **rates)
        stepped = train_step(
            model, task, train_data, idx, draws, slices, guard, optimizer, scaler, autocast
        )
        # a skipped update left the weights as they were: the EMA moves towards them
        if stepped:
            update_ema(ema, raw_model, run.step - start)
        run.step += 1
        bar.update()
        steps_since += 1
        if prof is not None:
            prof.step()

        # evaluate every eval_interval steps and at each round's end
        evaluating = (eval_interval and run.step % eval_interval == 0) or run.step in task.ends
        if run.step % log_interval == 0 or evaluating:
            guard.check(run, master)
        if master and (run.step % log_interval == 0 or run.step == max_iters):
            dt = time.time() - t_last
            flops = flops_fwd * task.calls() * steps_since
            # N GPUs: N peaks
            images = steps_since * global_batch
            evaluate.log_progress(
                config, run, guard, lr_now, steps_since, images, dt, flops, peak * world
            )
            steps_since = 0
            t_last = time.time()
        if evaluating:
            stop = evaluate.evaluate(trained, val_data, shape, reference, autocast, master)
            # do not count evaluation in img/s
            t_last = time.time()
            if stop:
                break
    bar.close()
    if prof is not None:
        prof.stop()
    # the shareable file: EMA weights + settings as JSON metadata, no optimizer, no pickle
    if master:
        checkpoint.export_safetensors(trained.state(), os.path.join(out_dir, 'model.safetensors'))
        print(f"exported the EMA weights to {out_dir}/model.safetensors")
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    # config files and --key=value overrides on the command line; resumed, over the run's own
    given = set()
    configure(globals(), given=given)
    if init_from == 'resume':
        path = os.path.join(out_dir, 'ckpt.pt')
        ckpt = checkpoint.load(path, training=True)
        resume(globals(), given, ckpt['config'], path, ckpt['step'], get_lr)
    try:
        main()
    except torch.OutOfMemoryError:
        raise SystemExit(
            f"error: CUDA out of memory at batch_size={batch_size}: lower batch_size (raise "
            "gradient_accumulation_steps to keep the global batch), set grad_checkpoint=True, "
            "or use a smaller model"
        ) from None
