"""
Public DiT weights into our DiT (model.py) and out of it, by an explicit key table (LAYOUT). In: an
official facebookresearch/DiT checkpoint (DiT-XL-2-256x256.pt, a state dict checkpoint.load reads
with weights_only=True) or a diffusers DiTTransformer2DModel (its folder, a pipeline folder, or a
hub id such as facebook/DiT-XL-2-256 where no such local path exists), as a checkpoint dict like
train.py's (sample.py --weights=, train.py --init_from=). Out: `checkpoint.py ckpt.pt
--to=diffusers OUT` writes a class-conditional VP DiT as OUT/transformer, OUT/scheduler (a
DDIMScheduler) and, for latents, a DiTPipeline's model_index.json (without the VAE).

What an official file does not say is the paper's: the size is its tensors' (heads: the paper's
table, else 64 wide), the schedule VP-linear eps, 1000 steps, and 4 input channels are SD-VAE
latents at 0.18215 (sd-vae-ft-ema, DiT's evaluation VAE); its learned variance is kept
(learn_sigma), unused. diffusers computes two things otherwise, and our DiT follows each file:
timestep frequencies 10000^(-k/127), the paper's -k/128 (DiTConfig.freq_shift), and the MLP's
LayerNorm epsilon norm_eps (default 1e-5), the paper's 1e-6. So an export of a model with the
paper's frequencies (trained here, or official) is a slightly different function in diffusers: the
export prints how far.
"""

import json
import math
import os
import re
import shutil
from dataclasses import replace

import torch

from model import DIT_SIZES, build_model, sincos_pos_embed

# the paper's heads by width (XL: 16 heads of 72); other widths get 64-wide heads, as S, B and L
HEADS = {width: heads for _, heads, width in DIT_SIZES.values()}
# the official DiTs' diffusion: DDPM's linear betas, eps-prediction
DIT_SCHEDULE = dict(objective='vp', schedule='linear', prediction='eps', num_timesteps=1000)
# 4 input channels: the SD VAE's latents at SD's single scale (DiT's sample_ddp.py decodes with ema)
SD_VAE = dict(vae='stabilityai/sd-vae-ft-ema', vae_subfolder='', scaling_factor=0.18215)
# our names for diffusers' scheduler settings
PREDICTIONS = {'eps': 'epsilon', 'v': 'v_prediction', 'x0': 'sample'}
BETAS = {'linear': 'linear', 'cosine': 'squaredcos_cap_v2'}
WEIGHTS = 'diffusion_pytorch_model.safetensors'
# (ours, the official layout's, diffusers'), each a weight and a bias (the label table a weight);
# b. is our block, B. theirs: diffusers' every block holds the timestep MLP and label table (copies:
# its final layer reads block 0's), and its q, k, v are our qkv's thirds
LAYOUT = [
    ('patch_embed', 'x_embedder.proj', 'pos_embed.proj'),
    ('t_embed.0', 't_embedder.mlp.0', 'B.norm1.emb.timestep_embedder.linear_1'),
    ('t_embed.2', 't_embedder.mlp.2', 'B.norm1.emb.timestep_embedder.linear_2'),
    ('y_embed', 'y_embedder.embedding_table', 'B.norm1.emb.class_embedder.embedding_table'),
    ('b.attn.qkv', 'B.attn.qkv', ('B.attn1.to_q', 'B.attn1.to_k', 'B.attn1.to_v')),
    ('b.attn.proj', 'B.attn.proj', 'B.attn1.to_out.0'),
    ('b.mlp.0', 'B.mlp.fc1', 'B.ff.net.0.proj'),
    ('b.mlp.2', 'B.mlp.fc2', 'B.ff.net.2'),
    ('b.adaLN.1', 'B.adaLN_modulation.1', 'B.norm1.linear'),
    ('adaLN_f.1', 'final_layer.adaLN_modulation.1', 'proj_out_1'),
    ('head', 'final_layer.linear', 'proj_out_2'),
]


def fail(path, why):
    raise SystemExit(f"error: {path} {why}")


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def key_pairs(layout, depth, share=1):
    """[(our key, (the layout's keys))] of every tensor, layout 'official' or 'diffusers' (LAYOUT);
    share: each of our blocks serves `share` consecutive layers (theirs have a block per layer)."""
    col = 1 if layout == 'official' else 2
    prefix = 'blocks.{}.' if col == 1 else 'transformer_blocks.{}.'
    table = []
    for row in LAYOUT:
        names = row[col] if isinstance(row[col], tuple) else (row[col],)
        for i in range(depth) if names[0].startswith('B.') else [0]:
            ours = f'blocks.{i // share}.{row[0][2:]}' if row[0][:2] == 'b.' else row[0]
            theirs = [n.replace('B.', prefix.format(i), 1) for n in names]
            for end in ('.weight',) if ours == 'y_embed' else ('.weight', '.bias'):
                table.append((ours + end, tuple(n + end for n in theirs)))
    return table


def to_ours(path, sd, pairs, ignore=()):
    """A state dict of the layout of `pairs` in our keys, or one line naming what does not fit."""
    ours, used = {}, set(ignore)
    for mine, names in pairs:
        missing = [n for n in names if n not in sd]
        if missing:
            fail(path, f"lacks {missing[0]}: it is not a DiT of the layout its other keys have")
        w = torch.cat([sd[n] for n in names]) if len(names) > 1 else sd[names[0]]
        if mine in ours and not torch.equal(ours[mine], w):
            fail(
                path,
                f"has its own {names[0]} (trained in diffusers?): our DiT has one timestep MLP and "
                "label table for all blocks, as the paper's",
            )
        ours[mine] = w
        used.update(names)
    extra = sorted(set(sd) - used)
    if extra:
        fail(path, f"has {len(extra)} weights a DiT has no place for ({extra[0]}, ...)")
    return ours


def heads_for(path, width):
    """The paper's heads for its widths, else 64-wide heads."""
    if width in HEADS or width % 64 == 0:
        return HEADS.get(width, width // 64)
    fail(path, f"is {width} wide, which matches no DiT size (S/B/L/XL, or a multiple of 64)")


def checked(path, sd, model_args, config, meta):
    """The checkpoint dict of weights `sd` (our keys) for model_args, or one line if a shape does
    not fit (checked on a model built on the meta device: nothing allocated)."""
    try:
        with torch.device('meta'):
            want = build_model(model_args).state_dict()
    except (SystemExit, TypeError, ValueError) as e:
        fail(path, f"has settings that make no DiT ({str(e).removeprefix('error: ')})")
    bad = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    missing = [k for k in want if k not in sd]
    if bad or missing:
        k = (bad or missing)[0]
        got = tuple(sd[k].shape) if k in sd else 'nothing'
        fail(path, f"has shapes no DiT size matches: {k} is {got}, {tuple(want[k].shape)} expected")
    sd = {k: v.float() for k, v in sd.items()}
    return dict(model_args=model_args, config=dict(config), meta=meta, ema=sd, model=sd)


def pixels_or_latents(meta, channels, size, vae=None):
    """meta as prepare.py writes it: pixels, or latents of the VAE `vae` (dict: vae, vae_subfolder,
    scaling_factor, shift_factor); 4 channels and no VAE named: the SD VAE's latents (DiT's)."""
    if vae is None and channels == 4:
        vae = SD_VAE
    if vae is None:
        return dict(meta, kind='pixels', channels=channels, resolution=size)
    vae = dict(dict(shift_factor=0.0), **vae)
    return dict(meta, kind='latents', latent_shape=[channels, size, size], **vae)


# -----------------------------------------------------------------------------
# in: the official layout


def read_official(path, sd):
    """An official facebookresearch/DiT state dict (checkpoint.load found a bare state dict) as a
    checkpoint dict, its settings read off its shapes; or one line."""
    if 'x_embedder.proj.weight' not in sd or 'pos_embed' not in sd:
        fail(
            path,
            "is a bare state_dict (weights only, no model_args) and no DiT in the official "
            "facebookresearch/DiT layout (no x_embedder.proj.weight, pos_embed): use a train.py "
            "ckpt.pt, a model.safetensors export or an official DiT .pt",
        )
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    ours = to_ours(path, sd, key_pairs('official', depth), ignore=('pos_embed',))
    width, channels, patch = ours['patch_embed.weight'].shape[:3]
    grid = math.isqrt(sd['pos_embed'].shape[1])
    out = ours['head.weight'].shape[0] // patch**2
    if out not in (channels, 2 * channels):
        fail(
            path,
            f"outputs {out} channels for {channels} in: neither a prediction nor one + a variance",
        )
    pos = sincos_pos_embed(width, grid)[None]
    if sd['pos_embed'].shape != pos.shape or (sd['pos_embed'].float() - pos).abs().max() > 1e-4:
        fail(path, "has a pos_embed that is not the fixed sin-cos table of a DiT")
    model_args = dict(
        arch='dit',
        input_size=grid * patch,
        in_channels=channels,
        patch_size=patch,
        n_layer=depth,
        n_head=heads_for(path, width),
        n_embd=width,
        # the last row of the label table is the null class
        num_classes=ours['y_embed.weight'].shape[0] - 1,
        learn_sigma=out == 2 * channels,
        freq_shift=0,
        mlp_norm_eps=1e-6,
    )
    name = f"official DiT weights ({os.path.basename(path)})"
    n = model_args['num_classes']
    meta = dict(dataset=name, num_classes=n, class_names=[str(i) for i in range(n)])
    meta = pixels_or_latents(meta, channels, grid * patch)
    return checked(path, ours, model_args, DIT_SCHEDULE, meta)


# -----------------------------------------------------------------------------
# in: diffusers' layout


def is_hub_id(path):
    """'owner/name' that is no local path (nor a checkpoint file's name): a hub id."""
    return (
        bool(re.fullmatch(r'[A-Za-z0-9][\w.-]*/[\w.-]+', path))
        and not os.path.exists(path)
        and not path.endswith(('.pt', '.pth', '.bin', '.ckpt', '.safetensors'))
    )


def is_diffusers(path):
    """Whether checkpoint.load should read `path` here: a folder, or a hub id."""
    return os.path.isdir(path) or is_hub_id(path)


def found(path):
    """train.py's --init_from check: a file, a folder or a hub id."""
    return os.path.exists(path) or is_hub_id(path)


def download(repo_id):
    """A hub pipeline's transformer, scheduler and VAE -> the local snapshot's folder."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ['model_index.json', 'transformer/*', 'scheduler/*', 'vae/*']
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        fail(repo_id, f"is no local path, and no hub id that could be fetched ({first_line(e)})")


def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(path, f"is not readable JSON ({first_line(e)})")


def schedule_of(root):
    """Our diffusion settings from a pipeline's scheduler/scheduler_config.json (DiT's if none)."""
    file = os.path.join(root or '', 'scheduler', 'scheduler_config.json')
    if root is None or not os.path.isfile(file):
        return DIT_SCHEDULE
    s = read_json(file)
    schedule = {v: k for k, v in BETAS.items()}.get(s.get('beta_schedule', 'linear'))
    prediction = {v: k for k, v in PREDICTIONS.items()}.get(s.get('prediction_type', 'epsilon'))
    betas = (s.get('beta_start', 1e-4), s.get('beta_end', 0.02))
    if schedule is None or prediction is None or schedule == 'linear' and betas != (1e-4, 0.02):
        fail(file, "is a schedule ours has no name for: linear betas 1e-4..0.02 or cosine only")
    T = s.get('num_train_timesteps', 1000)
    return dict(objective='vp', schedule=schedule, prediction=prediction, num_timesteps=T)


def read_diffusers(path, device='cpu'):
    """A diffusers DiTTransformer2DModel (its folder, a pipeline folder, or a hub id) as a
    checkpoint dict, computed as diffusers computes it (freq_shift=1, its norm_eps); or one line."""
    local = download(path) if is_hub_id(path) else path
    root, folder = (local, os.path.join(local, 'transformer'))
    if not os.path.isdir(folder):
        parent = os.path.dirname(os.path.abspath(local))
        root = parent if os.path.isfile(os.path.join(parent, 'model_index.json')) else None
        folder = local
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        fail(path, "has no config.json (nor transformer/config.json): it is no diffusers model")
    c = read_json(os.path.join(folder, 'config.json'))
    dit = c.get('_class_name') in ('DiTTransformer2DModel', 'Transformer2DModel')
    dit = dit and c.get('norm_type') == 'ada_norm_zero' and not c.get('cross_attention_dim')
    if not dit or c.get('activation_fn', 'gelu-approximate') != 'gelu-approximate':
        fail(
            path, f"is a {c.get('_class_name')} ({c.get('norm_type')}), not a class-conditional DiT"
        )
    sd = read_weights(path, folder, device)
    depth, heads, channels = c['num_layers'], c['num_attention_heads'], c['in_channels']
    model_args = dict(
        arch='dit',
        input_size=c['sample_size'],
        in_channels=channels,
        patch_size=c['patch_size'],
        n_layer=depth,
        n_head=heads,
        n_embd=heads * c['attention_head_dim'],
        num_classes=c['num_embeds_ada_norm'],
        learn_sigma=(c.get('out_channels') or channels) == 2 * channels,
        freq_shift=1,
        mlp_norm_eps=c.get('norm_eps', 1e-5),
    )
    ours = to_ours(path, sd, key_pairs('diffusers', depth), ignore=('pos_embed.pos_embed',))
    # the VAE of a pipeline: named as the user named it (a hub id, not its snapshot's path)
    home = path if is_hub_id(path) else root
    return checked(path, ours, model_args, schedule_of(root), meta_of(path, root, home, c))


def read_weights(path, folder, device):
    """diffusion_pytorch_model.safetensors (or .bin, read with weights_only=True)."""
    file = os.path.join(folder, WEIGHTS)
    try:
        if os.path.isfile(file):
            from safetensors.torch import load_file

            return load_file(file, device=str(device))
        file = file.replace('.safetensors', '.bin')
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:
        fail(path, f"has no readable {os.path.basename(file)} ({first_line(e)})")


def meta_of(path, root, home, c):
    """meta for a diffusers DiT: an export's own record, else the pipeline's labels (id2label) and
    VAE (vae/ of `home`, its scaling_factor)."""
    n, size, channels = c['num_embeds_ada_norm'], c['sample_size'], c['in_channels']
    own = c.get('_nanodiffusion', {})
    index = os.path.join(root or '', 'model_index.json')
    labels = {}
    if root and os.path.isfile(index):
        labels = read_json(index).get('id2label') or {}
    names = [labels.get(str(i), str(i)).split(',')[0].strip() for i in range(n)]
    meta = dict(dataset=f"diffusers DiT ({path})", num_classes=n, class_names=names)
    vae = own.get('vae')
    if vae is None and root and os.path.isfile(os.path.join(root, 'vae', 'config.json')):
        scale = read_json(os.path.join(root, 'vae', 'config.json')).get('scaling_factor', 0.18215)
        vae = dict(vae=home, vae_subfolder='vae', scaling_factor=scale)
    return dict(pixels_or_latents(meta, channels, size, vae), **own.get('meta', {}))


# -----------------------------------------------------------------------------
# out: diffusers' layout


def is_public(model_args):
    """Whether model_args are a public checkpoint's network as read here (they name freq_shift;
    train.py's own never do): train.py fine-tunes and resumes that network, not its settings'."""
    return 'freq_shift' in model_args


def refusal(args, config):
    """Why diffusers' DiT cannot hold this model (None: it can)."""
    for bad, why in (
        (args['arch'] != 'dit', "it is a UNet, not a DiT"),
        (args.get('text_dim'), "it attends to captions (diffusers' DiT has no cross-attention)"),
        (args.get('hint_channels'), "it has a control branch: export its base checkpoint"),
        (args.get('guidance'), "it is a guidance-distilled student (a CFG-scale input)"),
        (config['objective'] != 'vp', "it is a rectified-flow model: DiTPipeline steps VP only"),
        (not args.get('num_classes'), "it is unconditional: diffusers' DiT needs class labels"),
    ):
        if bad:
            return why
    return None


def transformer_config(args, meta):
    """config.json of the DiTTransformer2DModel our model_args make (and what sampling needs of
    meta, as a private key diffusers ignores)."""
    own = dict(meta={k: meta[k] for k in ('dataset', 'class_names') if k in meta})
    if meta.get('kind') == 'latents':
        keys = ('vae', 'vae_subfolder', 'scaling_factor', 'shift_factor')
        own['vae'] = {k: meta[k] for k in keys if k in meta}
    c = args['in_channels']
    return dict(
        _class_name='DiTTransformer2DModel',
        num_attention_heads=args['n_head'],
        attention_head_dim=args['n_embd'] // args['n_head'],
        in_channels=c,
        out_channels=c * (2 if args.get('learn_sigma') else 1),
        num_layers=args['n_layer'],
        sample_size=args['input_size'],
        patch_size=args['patch_size'],
        activation_fn='gelu-approximate',
        attention_bias=True,
        num_embeds_ada_norm=args['num_classes'],
        norm_type='ada_norm_zero',
        norm_elementwise_affine=False,
        norm_eps=args.get('mlp_norm_eps', 1e-6),
        _nanodiffusion=own,
    )


def scheduler_config(config):
    """A DDIMScheduler of our VP schedule (its 'leading' grid is our --spacing=leading)."""
    return dict(
        _class_name='DDIMScheduler',
        num_train_timesteps=config['num_timesteps'],
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule=BETAS[config['schedule']],
        prediction_type=PREDICTIONS[config['prediction']],
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing='leading',
    )


def freq_shift_gap(model):
    """How far diffusers' DiT (freq_shift=1) is from `model` (the paper's frequencies), on a probe
    of noise at t = 999 and 500: (max |difference|, rms of the model's output)."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size, generator=g)
    t, y = torch.tensor([999.0, 500.0]), torch.tensor([0, c.num_classes - 1])
    with torch.no_grad():
        ours = model(x, t, y)
        model.config = replace(c, freq_shift=1)
        theirs = model(x, t, y)
    model.config = c
    return (theirs - ours).abs().max().item(), ours.pow(2).mean().sqrt().item()


def export_diffusers(ckpt, out, src):
    """ckpt's EMA weights as a diffusers folder at `out` (written beside it, then renamed into
    place); -> the lines to print."""
    args, config, meta = ckpt['model_args'], ckpt['config'], ckpt['meta']
    why = refusal(args, config)
    if why:
        fail(src, f"cannot be exported to diffusers' DiT: {why}")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, 'transformer', 'config.json')):
        fail(out, "exists and is no earlier export: pass a new folder")
    model = build_model(args)
    model.load_state_dict(ckpt['ema'])
    pairs = key_pairs('diffusers', args['n_layer'], args.get('share', 1))
    sd = model.state_dict()
    # what the table lacks is unused in sampling (REPA's projector, an augmentation input): left out
    weights = {}
    for mine, names in pairs:
        # copies: safetensors refuses tensors that share memory (our qkv's thirds, the embeddings)
        for n, w in zip(names, sd[mine].chunk(len(names))):
            weights[n] = w.detach().float().cpu().clone()
    latent = meta.get('kind') == 'latents'
    files = {
        'transformer/config.json': transformer_config(args, meta),
        'scheduler/scheduler_config.json': scheduler_config(config),
    }
    if latent:
        files['model_index.json'] = dict(
            _class_name='DiTPipeline',
            transformer=['diffusers', 'DiTTransformer2DModel'],
            scheduler=['diffusers', 'DDIMScheduler'],
            vae=['diffusers', 'AutoencoderKL'],
            id2label={str(i): n for i, n in enumerate(meta.get('class_names') or [])},
        )
    write_folder(out, files, weights)
    lines = [
        f"wrote {out} (the EMA weights of {src}): transformer/ (DiTTransformer2DModel), scheduler/ "
        "(DDIMScheduler)"
        + (
            f", model_index.json (DiTPipeline; its VAE is not bundled, nothing is downloaded here: "
            f"pass vae=AutoencoderKL.from_pretrained({meta['vae']!r}))"
            if latent
            else ''
        )
    ]
    return lines + notes(model, meta)


def notes(model, meta):
    """What an export's user must know: where diffusers computes another function than ours."""
    c, out = model.config, []
    if c.freq_shift != 1:
        gap, rms = freq_shift_gap(model)
        out.append(
            "note: diffusers' DiT spaces its timestep frequencies by 1/127, this model by 1/128 "
            f"(the paper's): diffusers' output differs from ours by up to {gap:.3g} (output rms "
            f"{rms:.3g}) on a probe; one trained with --freq_shift=1, or read from diffusers, "
            "exports exactly"
        )
    if c.num_classes != 1000 and meta.get('kind') == 'latents':
        out.append(
            f"note: DiTPipeline's CFG takes class 1000 as the null class; this model's is "
            f"{c.num_classes}: call it with guidance_scale=1, or guide it yourself"
        )
    if meta.get('shift_factor'):
        out.append(
            f"note: DiTPipeline decodes without the VAE's shift_factor {meta['shift_factor']}"
        )
    return out


def write_folder(out, files, weights):
    """files (relative path -> JSON) and transformer/ weights into `out`: written into a folder
    beside it, which then replaces it, so a failure never leaves half an export."""
    from safetensors.torch import save_file

    tmp = f"{out.rstrip('/')}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        for name, doc in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), 'w') as f:
                json.dump(doc, f, indent=2)
        save_file(weights, os.path.join(tmp, 'transformer', WEIGHTS))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(out, f"cannot be written ({e.strerror or e})")
