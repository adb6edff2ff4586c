"""
Throughput and profiling: train.py's own training step (train.train_step: the same model,
precision, compile, optimiser and guarded update), timed. The CPU demo model on the real shapes
data; DiT-B/2 on 32x32x4 latents (a GPU), beside diffusers'; with less memory (blocks recomputed
in backward); a torch.profiler trace into bench_trace.json; every GPU figure of BENCHMARKS.md,
written there (bench_suite.py):

    python bench.py config/shapes.py
    python bench.py --size=B/2 --resolution=32 --channels=4
    python bench.py --size=XL/2 --batch_size=256 --grad_checkpoint=True
    python bench.py config/shapes.py --profile=True
    python bench.py --suite=True

Prints one table: train img/s, MFU (analytic FLOPs from torch.utils.flop_counter / the peak FLOP/s
it names), peak memory, the data-loading share of step time, and sampling img/s. For a
class-conditional DiT, the same rows for diffusers' DiTTransformer2DModel of the same size (same
batches, precision, compile and step, in the same run) and the ratio ours / diffusers.
"""

import sys
import time

import numpy as np
import torch

import train
from diffusion import Denoise, Diffusion
from samplers import guided, sample_loop
from model import DIT_SIZES, UNet, build_model, input_shape, model_args_from, setup_device
from configurator import check
from data import Batch, Data, batch_indices, draw, read_meta
from optim import Guard, make_optimizer
from bench_suite import run_suite
from flops import flops_per_image, guess_peak_flops

# -----------------------------------------------------------------------------
# the model keys mean what they mean in train.py, so `python bench.py config/x.py` measures that
# config

# a prepare.py dataset (times the real loader); '' = random data of the shape below
data_dir = ''
resolution = 32
channels = 4
num_classes = 1000
# random data: > 0 conditions on random captions of text_len tokens x text_dim (a T2I model)
text_len = 0
text_dim = 768
# a dataset with pre-encoded captions: time the text model (as train.py trains it)
use_text = True
# a DiT size from the paper, e.g. 'B/2' (overrides the arch keys below)
size = ''
arch = 'dit'
patch_size = 2
n_layer = 12
n_head = 6
n_embd = 384
share_blocks = 1
# the official DiT checkpoints' network: its output's second half a learned variance
learn_sigma = False
unet_channels = 64
unet_mult = (1, 2, 2)
unet_blocks = 1
objective = 'flow'
schedule = 'cosine'
prediction = 'v'
num_timesteps = 1000
batch_size = 64
# untimed steps first (compile, allocator, cudnn autotune): peak memory is theirs
warmup = 5
# timed steps
iters = 20
# as train.py: recompute each block's activations in backward (less memory, more compute)
grad_checkpoint = False
# a DiT: also time diffusers' DiTTransformer2DModel of the same size (needs diffusers)
peer = True
# the sampling row; 0 = none
sample_steps = 20
sample_batch = 64
cfg_scale = 4.0
device = 'auto'
dtype = 'auto'
# CUDA only, as in train.py
compile = True
# torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune', ...
compile_mode = 'default'
# 0 = guess from the GPU name
peak_flops = 0.0
profile = False
# instead: every GPU figure (bench_suite.SUITE), each in its own process, -> BENCHMARKS.md
suite = False
# instead: VAE encode img/s, ours vs diffusers' AutoencoderKL with the same weights;
# a hub id/folder, or 'random' for SD-size random weights (no download)
vae = ''
vae_resolution = 256
vae_batch = 8
seed = 1337
# -----------------------------------------------------------------------------


def check_config():
    """What each setting may be, in one place: a bad value is one line before anything is built."""
    positive = (
        'resolution channels text_dim patch_size n_layer n_head n_embd share_blocks unet_channels '
        'unet_blocks num_timesteps batch_size iters warmup sample_batch vae_resolution vae_batch'
    )
    compile_modes = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
    check(
        globals(),
        positive=positive.split(),
        non_negative=('num_classes', 'text_len', 'sample_steps', 'cfg_scale', 'peak_flops', 'seed'),
        choices=dict(
            arch=('dit', 'unet'),
            objective=('flow', 'vp'),
            schedule=('linear', 'cosine'),
            prediction=('eps', 'v', 'x0'),
            dtype=('auto', 'float32', 'bfloat16', 'float16'),
            size=('',) + tuple(f"{k}/{p}" for k in DIT_SIZES for p in (2, 4, 8)),
            compile_mode=compile_modes,
        ),
    )
    if vae and vae_resolution % 8:
        sys.exit(f"error: --vae_resolution={vae_resolution} must be a multiple of 8")
    if suite and not torch.cuda.is_available():
        sys.exit(
            "error: --suite=True measures GPU figures and torch sees no CUDA GPU here: "
            "BENCHMARKS.md is unchanged"
        )


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def vae_table():
    """Encode img/s of vae.AutoencoderKL and of diffusers' AutoencoderKL holding the same weights,
    same run."""
    from vae import AutoencoderKL

    dev, _, autocast = setup_device(device, dtype)
    ours = (
        (AutoencoderKL() if vae == 'random' else AutoencoderKL.from_pretrained(vae)).to(dev).eval()
    )
    x = torch.randn(vae_batch, 3, vae_resolution, vae_resolution, device=dev)

    def rate(encode):
        with torch.no_grad(), autocast:
            # warm-up
            encode(x)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(3):
                encode(x)
            sync(dev)
        return 3 * vae_batch / (time.perf_counter() - t0)

    ours_rate = rate(lambda v: ours.encode(v, tiled=False).mean)
    print(
        f"VAE encode {vae_resolution}px, batch {vae_batch}, {dev}: ours {ours_rate:.2f} img/s",
        flush=True,
    )
    try:
        import diffusers
    except ImportError:
        return print("diffusers not installed: no side-by-side")
    from dataclasses import asdict

    ref = diffusers.AutoencoderKL(
        **{k: v for k, v in asdict(ours.config).items() if k != 'shift_factor'},
        down_block_types=['DownEncoderBlock2D'] * len(ours.config.block_out_channels),
        up_block_types=['UpDecoderBlock2D'] * len(ours.config.block_out_channels),
    )
    ref.load_state_dict(ours.state_dict())
    ref = ref.to(dev).eval()
    ref_rate = rate(lambda v: ref.encode(v).latent_dist.mean)
    print(
        f"diffusers AutoencoderKL.encode: {ref_rate:.2f} img/s | ours / diffusers = "
        f"{ours_rate / ref_rate:.2f}x"
    )


def mfu(fwd_flops, img_s, peak):
    """Model FLOPs utilisation: forward + backward = 3x the forward FLOPs (checkpointing's
    recompute is not counted)."""
    if not peak:
        return 'n/a (no known peak)'
    return f"{300 * fwd_flops * img_s / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s"


def data_spec():
    """-> (shape [C, H, W], num_classes, text_len, text_dim) of the batches to time: the dataset's,
    or the settings'."""
    # random data; text_len > 0: a text model on random captions (no classes then)
    if not data_dir:
        return (
            (channels, resolution, resolution),
            0 if text_len else num_classes,
            text_len,
            text_dim if text_len else 0,
        )
    meta = read_meta(data_dir)
    if use_text and 'text_dim' in meta:
        return input_shape(meta), 0, meta['text_max_len'], meta['text_dim']
    return input_shape(meta), meta['num_classes'], 0, 0


def model_args(shape, ncls, text_width):
    """build_model's dict: the arch keys as train.py reads them, or a DiT size of the paper
    (--size=B/2) over them. The size sets depth, heads and width only: the captions (text_len,
    text_dim) stay the settings'."""
    cfg = dict(globals())
    if size:
        name, patch = size.split('/')
        depth, heads, width = DIT_SIZES[name]
        cfg.update(arch='dit', patch_size=int(patch), n_layer=depth, n_head=heads, n_embd=width)
    args = model_args_from(cfg, shape, ncls, text_width)
    return dict(args, learn_sigma=True) if learn_sigma and args['arch'] == 'dit' else args


class RandomData:
    """Random examples held on the host like the memmap, with the batch() of data.Data that
    train.py's step takes (the same gather into pinned memory and copy to the device, so the copy
    is timed); text_len > 0: random captions too."""

    def __init__(self, dev, shape, ncls, L, D):
        n = batch_size * 4
        self.host = [torch.randn(n, *shape), torch.randint(0, max(ncls, 1), (n,))]
        # random caption states, a mask with 1..L real tokens, pooled vectors
        if L:
            mask = torch.arange(L) < torch.randint(1, L + 1, (n, 1))
            self.host += [torch.randn(n, L, D), mask, torch.randn(n, D)]
        self.device, self.latent = dev, False

    def __len__(self):
        return len(self.host[0])

    def fetch(self, a, idx):
        a = a[torch.from_numpy(idx)]
        if self.device.type == 'cuda':
            a = a.pin_memory()
        return a.to(self.device, non_blocking=True)

    def batch(self, idx, draws):
        x, y, *caps = [self.fetch(h, idx) for h in self.host]
        return Batch(x, y, tuple(caps) or None, None)


def bench_data(dev, shape, ncls, L, D):
    """The batches to time: the dataset's (data.Data, as train.py reads it) or random ones."""
    if data_dir:
        return Data(data_dir, 'train', dev, D > 0)
    return RandomData(dev, shape, ncls, L, D)


def step_inputs(data, diffusion, shape, i):
    """The i-th step's (idx, draws), as train.py makes them."""
    idx = batch_indices(i, len(data), batch_size, seed)
    return idx, draw(diffusion, i, batch_size, shape, data.device, seed, data.latent)


def ready(model, diffusion, data, shape, dev, ptdtype, autocast):
    """model on dev, compiled (on CUDA) as train.py compiles it, and train.py's own step on it
    (train.train_step: the loss, backward, guarded update with clipping, AdamW with its
    weight-decay groups), run warmup times untimed (compilation, allocator, autotuning) -> (net,
    step(i), the peak GiB those steps allocated beyond what dev held before; None on a CPU).
    Raises torch.OutOfMemoryError."""
    base = torch.cuda.memory_allocated(dev) if dev.type == 'cuda' else 0
    # as train.py: the layout of cuDNN's tensor-core convolutions
    nhwc = dev.type == 'cuda' and isinstance(model, UNet)
    model.to(dev, memory_format=torch.channels_last if nhwc else torch.preserve_format)
    net = torch.compile(model, mode=compile_mode) if compile and dev.type == 'cuda' else model
    # train.py's default optimiser settings
    keys = (
        'lr',
        'weight_decay',
        'beta1',
        'beta2',
        'optim',
        'grad_clip',
        'max_bad_steps',
        'out_dir',
    )
    cfg = {k: getattr(train, k) for k in keys}
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16)
    guard = Guard(dev, ptdtype == torch.float16, cfg)
    task = Denoise(diffusion)
    slices = [slice(0, batch_size)]

    def step(i):
        idx, draws = step_inputs(data, diffusion, shape, i)
        args = (guard, optimizer, scaler, autocast)
        return train.train_step(net, task, data, idx, draws, slices, *args)

    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(warmup):
        step(i)
    sync(dev)
    mem = (torch.cuda.max_memory_allocated(dev) - base) / 2**30 if dev.type == 'cuda' else None
    return net, step, mem


def time_steps(steps, data, diffusion, shape, dev):
    """iters timed steps of each step in steps, interleaved: every batch goes through each model
    in turn, so a machine busy with other work slows them alike -> [(img/s, seconds per step, data
    share of it)], one per step. The data share: the batch's assembly (data.batch, which the step
    runs) timed on its own, as a share of the step."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    t_data, t_step = 0.0, [0.0] * len(steps)
    for i in range(warmup, warmup + iters):
        t0 = time.perf_counter()
        idx, draws = step_inputs(data, diffusion, shape, i)
        data.batch(idx, draws)
        sync(dev)
        t_data += time.perf_counter() - t0
        for j, step in enumerate(steps):
            t0 = time.perf_counter()
            step(i)
            sync(dev)
            t_step[j] += time.perf_counter() - t0
    return [(batch_size * iters / t, t / iters, min(t_data / t, 1.0)) for t in t_step]


def peer_model(args):
    """diffusers' DiTTransformer2DModel of the size of our DiT args, behind our forward(x, t, y,
    text) so that diffusion.loss drives it as it drives ours; or a line saying why there is none
    (diffusers is a test-only dependency). out_channels = in_channels: ours predicts no learned
    variance."""
    if args['arch'] != 'dit' or args.get('text_dim') or args.get('share', 1) != 1:
        return "none for this model (diffusers' DiT is class-conditional, without shared blocks)"
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return "skipped: diffusers is not installed (pip install diffusers)"

    class Peer(DiTTransformer2DModel):
        def forward(self, x, t, y, text=None):
            return super().forward(x, t, y, return_dict=False)[0]

    return Peer(
        num_attention_heads=args['n_head'],
        attention_head_dim=args['n_embd'] // args['n_head'],
        in_channels=args['in_channels'],
        out_channels=args['in_channels'] * (2 if args.get('learn_sigma') else 1),
        num_layers=args['n_layer'],
        sample_size=args['input_size'],
        patch_size=args['patch_size'],
        norm_type='ada_norm_zero',
        num_embeds_ada_norm=max(args['num_classes'], 1),
    )


def main():
    check_config()
    if suite:
        # to every bench.py run
        extra = ''.join(f' {a}' for a in sys.argv[1:] if not a.startswith('--suite'))
        return run_suite(extra)
    if vae:
        return vae_table()
    dev, ptdtype, autocast = setup_device(device, dtype)
    torch.manual_seed(seed)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # L, D: the captions' tokens and width (0, 0: a class-conditional model)
    shape, ncls, L, D = data_spec()
    data = bench_data(dev, shape, ncls, L, D)
    args = model_args(shape, ncls, D)
    model = build_model(args)
    model.grad_checkpoint = grad_checkpoint
    flops = flops_per_image(model, shape, L)
    diffusion = Diffusion(objective, schedule, prediction, num_timesteps)
    try:
        net, train_step, mem = ready(model, diffusion, data, shape, dev, ptdtype, autocast)
    except torch.OutOfMemoryError:
        raise SystemExit(
            f"error: CUDA out of memory at batch_size={batch_size}: set --grad_checkpoint=True "
            "or lower --batch_size"
        ) from None
    # the peer: diffusers' DiT of the same size, readied the same way beside ours, timed on the same
    # batches
    steps, peer_net = [train_step], peer_model(args) if peer else 'off (--peer=False)'
    if not isinstance(peer_net, str):
        if grad_checkpoint:
            peer_net.enable_gradient_checkpointing()
        peer_flops, peer_params = (
            flops_per_image(peer_net, shape, 0),
            sum(p.numel() for p in peer_net.parameters()),
        )
        try:
            steps.append(ready(peer_net, diffusion, data, shape, dev, ptdtype, autocast)[1])
        except torch.OutOfMemoryError:
            peer_net = f"out of memory at batch_size={batch_size} beside ours"
    timed = time_steps(steps, data, diffusion, shape, dev)
    train_img_s, step_time, data_share = timed[0]
    peak = peak_flops or guess_peak_flops(dev)

    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
        with torch_profile(activities=acts, record_shapes=True) as prof:
            for i in range(3):
                train_step(i)
            sync(dev)
        prof.export_chrome_trace('bench_trace.json')
        print(
            prof.key_averages().table(
                sort_by='self_cpu_time_total' if dev.type == 'cpu' else 'self_cuda_time_total',
                row_limit=12,
            )
        )
        print('wrote bench_trace.json (open in chrome://tracing or https://ui.perfetto.dev)')

    # sampling: DPM-Solver++(2M), CFG as one batched call of 2x the batch per step, EMA-free weights
    sample_img_s = 'not timed (--sample_steps=0)'
    if sample_steps:
        model.eval()
        y = torch.randint(0, max(ncls, 1), (sample_batch,), device=dev)
        x = torch.randn(sample_batch, *shape, device=dev)
        caps = empty = None
        # prompts and the empty caption: the shapes of real ones (their values do not change the
        # timing)
        if D:
            caps = (
                torch.randn(sample_batch, L, D, device=dev),
                torch.ones(sample_batch, L, dtype=torch.bool, device=dev),
                torch.randn(sample_batch, D, device=dev),
            )
            empty = tuple(a[:1] for a in caps)
        with torch.no_grad(), autocast:
            fn = guided(net, diffusion, y, ncls, cfg_scale, caps, empty)
            # warm-up (compile for the eval shapes)
            sample_loop(fn, x, diffusion, 2)
            sync(dev)
            t0 = time.perf_counter()
            sample_loop(fn, x, diffusion, sample_steps)
            sync(dev)
        sample_img_s = f"{sample_batch / (time.perf_counter() - t0):.1f}"

    name = f"DiT-{size}" if size else f"DiT L{n_layer} d{n_embd} p{patch_size}"
    if arch == 'unet' and not size:
        name = f"UNet {unet_channels}x{tuple(unet_mult)}"
    compiled = f'on ({compile_mode})' if net is not model else 'off'
    settings = f"{str(ptdtype).split('.')[-1]} / {compiled}"
    where = f"cpu ({torch.get_num_threads()} threads)"
    if dev.type == 'cuda':
        where = torch.cuda.get_device_name(dev)
    rows = [
        ('device', where),
        (
            'model',
            f"{name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, input "
            f"{'x'.join(map(str, shape))}" + (f", text {L}x{D}" if D else ''),
        ),
        ('precision / compile', settings + (' / grad checkpointing' if grad_checkpoint else '')),
        ('batch', str(batch_size)),
        ('train img/s', f"{train_img_s:.1f}"),
        ('train step', f"{1000 * step_time:.1f} ms"),
        ('fwd GFLOP/img', f"{flops / 1e9:.3f} (x3 for a train step)"),
        ('MFU', mfu(flops, train_img_s, peak)),
        ('peak memory', f"{mem:.2f} GiB (training)" if mem is not None else 'n/a (CPU)'),
        ('data share of step', f"{100 * data_share:.1f}%"),
        (f'sample img/s ({sample_steps} steps, cfg)', sample_img_s),
        (
            'diffusers DiT',
            peer_net
            if isinstance(peer_net, str)
            else f"DiTTransformer2DModel, {peer_params / 1e6:.1f}M params, "
            f"fwd {peer_flops / 1e9:.3f} GFLOP/img",
        ),
    ]
    if len(timed) > 1:
        img_s = timed[1][0]
        rows += [
            ('diffusers train img/s', f"{img_s:.1f}"),
            ('diffusers MFU', mfu(peer_flops, img_s, peak)),
            ('ours / diffusers', f"{train_img_s / img_s:.2f}x train img/s"),
        ]
    width = max(len(k) for k, _ in rows)
    print('\n'.join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == '__main__':
    from configurator import configure

    configure(globals(), ignore_unknown_in_files=True)
    main()
