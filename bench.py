"""
Throughput and profiling: the same model, precision, compile and optimiser step as train.py, timed.

    python bench.py config/shapes.py                         # the CPU demo model on the real shapes data
    python bench.py --size=B/2 --resolution=32 --channels=4  # DiT-B/2 on 32x32x4 random latents (GPU)
    python bench.py config/shapes.py --profile=True          # + a torch.profiler trace in bench_trace.json

Prints one table: train img/s, MFU (analytic FLOPs from torch.utils.flop_counter / the peak FLOP/s it
names), peak memory, the data-loading share of step time, and sampling img/s.
"""
import os
import sys
import time

import numpy as np
import torch

from diffusion import Diffusion, guided, sample_loop
from model import DIT_SIZES, build_model, input_shape, model_args_from, setup_device
from configurator import check
from data import Data, read_meta
from train import flops_per_image, guess_peak_flops

# -----------------------------------------------------------------------------
# the model keys mean what they mean in train.py, so `python bench.py config/x.py` measures that config
data_dir = ''                # a prepare.py dataset (times the real loader); '' = random data of the shape below
resolution = 32
channels = 4
num_classes = 1000
text_len = 0                 # random data: > 0 conditions on random captions of text_len tokens x text_dim (a T2I model)
text_dim = 768
use_text = True              # a dataset with pre-encoded captions: time the text model (as train.py trains it)
size = ''                    # a DiT size from the paper, e.g. 'B/2' (overrides the arch keys below)
arch = 'dit'
patch_size = 2
n_layer = 12
n_head = 6
n_embd = 384
share_blocks = 1
unet_channels = 64
unet_mult = (1, 2, 2)
unet_blocks = 1
objective = 'flow'
schedule = 'cosine'
prediction = 'v'
num_timesteps = 1000
batch_size = 64
warmup = 5                   # untimed steps first (compile, allocator, cudnn autotune)
iters = 20                   # timed steps
sample_steps = 20
sample_batch = 64
cfg_scale = 4.0
device = 'auto'
dtype = 'auto'
compile = True               # CUDA only, as in train.py
peak_flops = 0.0             # 0 = guess from the GPU name
profile = False
solvers = False              # instead: the exact-answer sampler error table (Gaussian data, closed-form ODE solution)
quality = ''                 # instead: a shapes checkpoint folder -> conditional accuracy vs NFE for each sampler
quality_per_class = 10
vae = ''                     # instead: VAE encode img/s, ours vs diffusers' AutoencoderKL with the same weights;
                             # a hub id/folder, or 'random' for SD-size random weights (no download)
vae_resolution = 256
vae_batch = 8
seed = 1337
# -----------------------------------------------------------------------------


def check_config():
    """What each setting may be, in one place: a bad value is one line before anything is built."""
    check(globals(), positive=('resolution', 'channels', 'text_dim', 'patch_size', 'n_layer', 'n_head', 'n_embd',
                               'share_blocks', 'unet_channels', 'unet_blocks', 'num_timesteps', 'batch_size', 'iters',
                               'sample_steps', 'sample_batch', 'quality_per_class', 'vae_resolution', 'vae_batch'),
          non_negative=('num_classes', 'text_len', 'warmup', 'cfg_scale', 'peak_flops', 'seed'),
          choices=dict(arch=('dit', 'unet'), objective=('flow', 'vp'), schedule=('linear', 'cosine'),
                       prediction=('eps', 'v', 'x0'), dtype=('auto', 'float32', 'bfloat16', 'float16'),
                       size=('',) + tuple(f"{k}/{p}" for k in DIT_SIZES for p in (2, 4, 8))))
    if vae and vae_resolution % 8:
        sys.exit(f"error: --vae_resolution={vae_resolution} must be a multiple of 8")


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def gaussian_x0(x_t, alpha, sigma, mu, s):
    """E[x0 | x_t] for data x0 ~ N(mu, s^2 I) and x_t = alpha x0 + sigma eps: the optimal denoiser in closed
    form, so every sampler has an exact answer to be measured against."""
    return mu + alpha * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2) * (x_t - alpha * mu)


def solver_errors(mu=0.3, s=0.5, nfes=(5, 10, 20, 50)):
    """Rows (model, sampler, [error at each NFE]): the RMS distance of each sampler's end point from the exact probability-flow ODE solution, which for
    Gaussian data maps the start x_T to mu + s * (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for objective in ('vp', 'flow'):
        diffusion = Diffusion(objective, 'linear', 'eps', 1000)

        def net(x_t, t):
            a, sg = (float(v) for v in diffusion.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
            x0 = gaussian_x0(x_t, a, sg, mu, s)
            return (x_t - x0) / sg if objective == 'flow' else (x_t - a * x0) / sg

        t0 = 1.0 if objective == 'flow' else diffusion.T - 1.0
        a, sg = (float(v) for v in diffusion.alpha_sigma(torch.tensor(t0, dtype=torch.float64)))
        exact = mu + s * (x - a * mu) / (a * a * s * s + sg * sg) ** 0.5
        rms = lambda out: (out - exact).pow(2).mean().sqrt().item()
        uniform = 'leading' if objective == 'vp' else 'linspace'  # time-uniform, as diffusers' DDIM default
        configs = [('dpm++', 2, 'logsnr'), ('dpm++', 1, 'logsnr'), ('dpm++', 3, 'logsnr'), ('dpm++', 2, 'karras'),
                   ('dpm++', 3, 'karras'), ('dpm++', 2, 'linspace'), ('ddim', 1, uniform)]
        if objective == 'flow':
            configs += [('euler', 1, 'linspace'), ('heun', 2, 'karras')]
        for sampler, order, spacing in configs:
            errs = []
            for nfe in nfes:
                steps = (nfe + 1) // 2 if sampler == 'heun' else nfe
                errs.append(rms(sample_loop(net, x.clone(), diffusion, steps, sampler, order, spacing)[0]))
            name = f"{sampler}{order if sampler == 'dpm++' else ''} {spacing}" + (' (our default)' if (sampler, order, spacing) == ('dpm++', 2, 'logsnr') else '')
            rows.append((objective, name, errs))
        if objective == 'vp':
            try:
                import diffusers
            except ImportError:
                rows.append(('vp', 'diffusers DPMSolverMultistep default: not installed', [float('nan')] * len(nfes)))
                continue
            errs = []
            for nfe in nfes:
                sched = diffusers.DPMSolverMultistepScheduler()  # its defaults: linear betas, 2M, linspace
                sched.set_timesteps(nfe)
                out = x.clone()
                for t in sched.timesteps:
                    out = sched.step(net(out, float(t)), t, out).prev_sample
                errs.append(rms(out))
            rows.append(('vp', 'diffusers DPMSolverMultistep (default config)', errs))
    return rows


def print_solver_table(nfes=(5, 10, 20, 50)):
    rows = solver_errors(nfes=nfes)
    width = max(len(r[1]) for r in rows)
    print(f"{'model':<6} {'sampler':<{width}}  " + '  '.join(f"{f'{n} NFE':>9}" for n in nfes))
    for objective, name, errs in rows:
        print(f"{objective:<6} {name:<{width}}  " + '  '.join(f"{e:9.2e}" for e in errs))


def quality_table(ckpt_dir, per_class, nfes=(5, 10, 20, 50)):
    """Conditional accuracy of samples from a trained shapes model, per sampler and NFE, graded by
    shapes.grade; the 1000-step DDPM ancestral sampler is the reference."""
    from shapes import grade, shape_caption
    from sample import encode_prompts, load_model, sample_images
    dev, _, autocast = setup_device(device, dtype)
    model, diffusion, meta, _ = load_model(os.path.join(ckpt_dir, 'ckpt.pt'), dev)
    labels = torch.arange(meta['num_classes']).repeat_interleave(per_class).to(dev)
    text = empty = None
    if model.config.text_dim:  # a text model is asked with the captions "a red circle", ...
        text, empty = encode_prompts([shape_caption(i) for i in labels.tolist()], meta, dev)
    uniform = 'linspace' if diffusion.objective == 'flow' else 'leading'
    configs = [('dpm++', 1, 'logsnr'), ('dpm++', 2, 'logsnr'), ('dpm++', 3, 'logsnr'), ('dpm++', 2, uniform), ('ddim', 1, uniform)]
    print(f"{len(labels)} samples per cell, cfg {cfg_scale}, {ckpt_dir}")
    print(f"{'sampler':<22}" + ''.join(f"{f'{n} NFE':>9}" for n in nfes))
    def acc(steps, **kw):
        x = sample_images(model, diffusion, labels if text is None else labels * 0, meta, cfg_scale, seed=seed,
                          autocast=autocast, steps=steps, text=text, null_text=empty, **kw)
        return 100 * grade(x.numpy(), labels.cpu().numpy())[0]
    for sampler, order, spacing in configs:
        accs = [acc(n, sampler=sampler, order=order, spacing=spacing) for n in nfes]
        name = f"{sampler}{order if sampler == 'dpm++' else ''} {spacing}"
        print(f"{name:<22}" + ''.join(f"{a:8.1f}%" for a in accs), flush=True)
    print(f"{'ddpm ' + uniform + ', 1000 NFE':<22}{acc(1000, sampler='ddpm', spacing=uniform):8.1f}%")


def vae_table():
    """Encode img/s of vae.AutoencoderKL and of diffusers' AutoencoderKL holding the same weights, same run."""
    from vae import AutoencoderKL
    dev, _, autocast = setup_device(device, dtype)
    ours = (AutoencoderKL() if vae == 'random' else AutoencoderKL.from_pretrained(vae)).to(dev).eval()
    x = torch.randn(vae_batch, 3, vae_resolution, vae_resolution, device=dev)
    def rate(encode):
        with torch.no_grad(), autocast:
            encode(x)  # warm-up
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(3):
                encode(x)
            sync(dev)
        return 3 * vae_batch / (time.perf_counter() - t0)
    ours_rate = rate(lambda v: ours.encode(v, tiled=False).mean)
    print(f"VAE encode {vae_resolution}px, batch {vae_batch}, {dev}: ours {ours_rate:.2f} img/s", flush=True)
    try:
        import diffusers
    except ImportError:
        return print("diffusers not installed: no side-by-side")
    from dataclasses import asdict
    ref = diffusers.AutoencoderKL(**{k: v for k, v in asdict(ours.config).items() if k != 'shift_factor'},
                                  down_block_types=['DownEncoderBlock2D'] * len(ours.config.block_out_channels),
                                  up_block_types=['UpDecoderBlock2D'] * len(ours.config.block_out_channels))
    ref.load_state_dict(ours.state_dict())
    ref = ref.to(dev).eval()
    ref_rate = rate(lambda v: ref.encode(v).latent_dist.mean)
    print(f"diffusers AutoencoderKL.encode: {ref_rate:.2f} img/s | ours / diffusers = {ours_rate / ref_rate:.2f}x")


def main():
    check_config()
    if vae:
        return vae_table()
    if solvers:
        return print_solver_table()
    if quality:
        return quality_table(quality, quality_per_class)
    dev, ptdtype, autocast = setup_device(device, dtype)
    torch.manual_seed(seed)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(dev)
    if data_dir:
        meta = read_meta(data_dir)
        text = use_text and 'text_dim' in meta
        data = Data(data_dir, 'train', dev, text)
        (c, res, _), ncls = input_shape(meta), 0 if text else meta['num_classes']
        L, D = (meta['text_max_len'], meta['text_dim']) if text else (0, 0)

        def get_batch():
            idx = np.sort(np.random.randint(0, len(data), batch_size))
            x, y = data.get(idx)
            return (x, y * 0, data.get_text(idx)) if text else (x, y, None)
    else:  # random data, held on the host like the memmap, so the host->device copy is still timed
        c, res, ncls, L, D = channels, resolution, 0 if text_len else num_classes, text_len, text_dim if text_len else 0
        host = [torch.randn(batch_size * 4, c, res, res), torch.randint(0, max(ncls, 1), (batch_size * 4,))]
        if L:  # random caption states, a mask with 1..L real tokens, pooled vectors
            host += [torch.randn(batch_size * 4, L, D), torch.arange(L) < torch.randint(1, L + 1, (batch_size * 4, 1)),
                     torch.randn(batch_size * 4, D)]
        host = [h.pin_memory() for h in host] if dev.type == 'cuda' else host

        def get_batch():
            i = np.random.randint(0, 4) * batch_size
            x, y, *caps = [h[i:i + batch_size].to(dev, non_blocking=True) for h in host]
            return x, y, tuple(caps) or None
    cfg = dict(globals())
    if size:  # a paper size overrides the DiT keys
        name, p = size.split('/')
        L, H, D = DIT_SIZES[name]
        cfg.update(arch='dit', patch_size=int(p), n_layer=L, n_head=H, n_embd=D)
    args = model_args_from(cfg, (c, res, res), ncls, D)
    model = build_model(args).to(dev)
    flops = flops_per_image(model, (c, res, res), L)
    diffusion = Diffusion(objective, schedule, prediction, num_timesteps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == 'cuda')
    scaler = torch.amp.GradScaler(dev.type, enabled=ptdtype == torch.float16)
    net = torch.compile(model) if compile and dev.type == 'cuda' else model

    def train_step(x0, y, caps):
        t = diffusion.sample_t(len(y), device=dev)
        with autocast:
            loss = diffusion.loss(net, x0, y, t, torch.randn_like(x0), text=caps)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        train_step(*get_batch())
    sync(dev)
    t_data = t_step = 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        batch = get_batch()
        sync(dev)
        t1 = time.perf_counter()
        train_step(*batch)
        sync(dev)
        t_data, t_step = t_data + t1 - t0, t_step + time.perf_counter() - t1
    step_time = (t_data + t_step) / iters
    train_img_s = batch_size / step_time
    peak = peak_flops or guess_peak_flops(dev)

    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
        with torch_profile(activities=acts, record_shapes=True) as prof:
            for _ in range(3):
                train_step(*get_batch())
            sync(dev)
        prof.export_chrome_trace('bench_trace.json')
        print(prof.key_averages().table(sort_by='self_cpu_time_total' if dev.type == 'cpu' else 'self_cuda_time_total', row_limit=12))
        print('wrote bench_trace.json (open in chrome://tracing or https://ui.perfetto.dev)')

    # sampling: DPM-Solver++(2M), CFG as one batched call of 2x the batch per step, EMA-free weights
    model.eval()
    y = torch.randint(0, max(ncls, 1), (sample_batch,), device=dev)
    x = torch.randn(sample_batch, c, res, res, device=dev)
    caps = empty = None
    if D:  # prompts and the empty caption: the shapes of real ones (their values do not change the timing)
        caps = (torch.randn(sample_batch, L, D, device=dev), torch.ones(sample_batch, L, dtype=torch.bool, device=dev),
                torch.randn(sample_batch, D, device=dev))
        empty = tuple(a[:1] for a in caps)
    with torch.no_grad(), autocast:
        fn = guided(net, diffusion, y, ncls, cfg_scale, caps, empty)
        sample_loop(fn, x, diffusion, 2)  # warm-up (compile for the eval shapes)
        sync(dev)
        t0 = time.perf_counter()
        sample_loop(fn, x, diffusion, sample_steps)
        sync(dev)
    sample_img_s = sample_batch / (time.perf_counter() - t0)

    name = size and f"DiT-{size}" or (f"DiT L{n_layer} d{n_embd} p{patch_size}" if arch == 'dit' else f"UNet {unet_channels}x{tuple(unet_mult)}")
    mem = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == 'cuda' else 'n/a (CPU)'
    mfu = f"{100 * 3 * flops * train_img_s / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else 'n/a (no known peak)'
    rows = [('device', torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f"cpu ({torch.get_num_threads()} threads)"),
            ('model', f"{name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, input {c}x{res}x{res}"
                      + (f", text {L}x{D}" if D else '')),
            ('precision / compile', f"{str(ptdtype).split('.')[-1]} / {'on' if net is not model else 'off'}"),
            ('batch', str(batch_size)),
            ('train img/s', f"{train_img_s:.1f}"),
            ('train step', f"{1000 * step_time:.1f} ms"),
            ('fwd GFLOP/img', f"{flops / 1e9:.3f} (x3 for a train step)"),
            ('MFU', mfu),
            ('peak memory', mem),
            ('data share of step', f"{100 * t_data / (t_data + t_step):.1f}%"),
            (f'sample img/s ({sample_steps} steps, cfg)', f"{sample_img_s:.1f}")]
    width = max(len(k) for k, _ in rows)
    print('\n'.join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), ignore_unknown_in_files=True)
    main()
