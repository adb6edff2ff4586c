"""Public DiT weights (dit_weights.py) on tiny random models, no downloads: the official
facebookresearch/DiT layout against a reference DiT written here from the official code's structure,
diffusers' layout and our exports against diffusers' own DiTTransformer2DModel and DiTPipeline, and
fine-tuning through train.py."""

import json
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

import checkpoint
import dit_weights
from conftest import one_error_line, one_line_exit, require
from model import build_model
from samplers import SAMPLERS, guided, sample_loop
from test_train import TINY, assert_same_run, run, weights
from vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.usefixtures('one_thread')
CPU = torch.device('cpu')
VP = ['--objective=vp', '--schedule=linear', '--prediction=eps']
# (input size, patch, channels, width, depth, classes, learned variance); heads: width / 64
OFFICIAL_SIZES = [(16, 4, 3, 64, 2, 12, True), (8, 2, 4, 128, 3, 10, False)]


# -----------------------------------------------------------------------------
# a reference DiT in the official layout, from the paper's code (explicit attention, numpy tables)


def pos_table(width, grid):
    """MAE's 2-D sin-cos table as the official code makes it: the x coordinate's half first."""

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    xs, ys = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([one_axis(width // 2, xs), one_axis(width // 2, ys)], axis=1)
    return torch.from_numpy(table).float()


def randomize(module):
    """Random weights of about unit gain, the zero-initialised layers too: outputs of order 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != 'pos_embed':
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.dim() > 1 else 9))
    return module


def linear_module(**layers):
    m = nn.Module()
    for name, layer in layers.items():
        setattr(m, name, layer)
    return m


class RefBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.attn = linear_module(qkv=nn.Linear(width, 3 * width), proj=nn.Linear(width, width))
        self.mlp = linear_module(fc1=nn.Linear(width, 4 * width), fc2=nn.Linear(4 * width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def attention(self, x):
        B, T, D = x.shape
        q, k, v = self.attn.qkv(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(-1)
        return self.attn.proj((a @ v).transpose(1, 2).reshape(B, T, D))

    def forward(self, x, c):
        norm = lambda h: nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attention(norm(x) * (1 + sc1) + s1)
        h = nn.functional.gelu(self.mlp.fc1(norm(x) * (1 + sc2) + s2), approximate='tanh')
        return x + g2 * self.mlp.fc2(h)


class RefDiT(nn.Module):
    """DiT with the official module names, so its state_dict is the official layout."""

    def __init__(self, size, patch, channels, width, depth, classes, learn_sigma):
        super().__init__()
        self.patch, self.out = patch, channels * (2 if learn_sigma else 1)
        self.x_embedder = linear_module(proj=nn.Conv2d(channels, width, patch, stride=patch))
        mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.t_embedder = linear_module(mlp=mlp)
        self.y_embedder = linear_module(embedding_table=nn.Embedding(classes + 1, width))
        grid = size // patch
        self.pos_embed = nn.Parameter(pos_table(width, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(width, width // 64) for _ in range(depth))
        self.final_layer = linear_module(
            linear=nn.Linear(width, patch * patch * self.out),
            adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)),
        )
        randomize(self)

    def forward(self, x, t, y):
        half = torch.arange(128, dtype=torch.float32) / 128
        args = t.float()[:, None] * torch.exp(-math.log(10000) * half)[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        c = self.t_embedder.mlp(t_freq) + self.y_embedder.embedding_table(y)
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        norm = nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)
        h = self.final_layer.linear(norm * (1 + scale) + shift)
        g, p = int(h.shape[1] ** 0.5), self.patch
        h = torch.einsum('nhwpqc->nchpwq', h.reshape(-1, g, g, p, p, self.out))
        return h.reshape(-1, self.out, g * p, g * p)


def official_file(tmp_path, size=OFFICIAL_SIZES[0], seed=0, edit=None):
    """A RefDiT's state dict saved as an official .pt -> (path, the reference model)."""
    torch.manual_seed(seed)
    ref = RefDiT(*size).eval()
    sd = ref.state_dict()
    if edit:
        edit(sd)
    path = str(tmp_path / f'official-{seed}.pt')
    torch.save(sd, path)
    return path, ref


def probe(channels, size, classes, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    return x, torch.tensor([999.0, 431.0, 3.0][:n]), torch.tensor([0, classes - 1, classes][:n])


@pytest.mark.parametrize('size', OFFICIAL_SIZES)
def test_official_layout_is_the_reference_forward(tmp_path, size):
    path, ref = official_file(tmp_path, size)
    model, diffusion, meta, config = checkpoint.load_model(path, CPU)
    c = model.config
    expect = (size[0], size[2], size[1], size[4], size[3] // 64, size[3], size[5], size[6])
    got = (c.input_size, c.in_channels, c.patch_size, c.n_layer, c.n_head, c.n_embd)
    assert got + (c.num_classes, c.learn_sigma) == expect and c.freq_shift == 0
    schedule = (diffusion.objective, diffusion.schedule, diffusion.prediction, diffusion.T)
    assert schedule == ('vp', 'linear', 'eps', 1000)
    # 4 channels: SD-VAE latents at SD's single scale
    assert meta['kind'] == ('latents' if size[2] == 4 else 'pixels')
    if size[2] == 4:
        assert meta['scaling_factor'] == 0.18215 and meta['vae'] == 'stabilityai/sd-vae-ft-ema'
    x, t, y = probe(size[2], size[0], size[5])
    with torch.no_grad():
        ours, theirs = model(x, t, y), ref(x, t, y)
    assert ours.shape == theirs.shape and theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() < 1e-5


def test_official_model_samples_with_every_sampler_and_ignores_the_variance(tmp_path):
    path, _ = official_file(tmp_path)
    model, diffusion, meta, _ = checkpoint.load_model(path, CPU)
    x, _, y = probe(3, 16, 12)
    fn = lambda m: guided(m, diffusion, y, m.config.num_classes, 4.0)
    # the same model with other numbers in the learned-variance half of its output
    other = build_model(dict(checkpoint.load(path)['model_args']))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        rows = torch.arange(other.head.weight.shape[0]) % other.out_channels >= 3
        other.head.weight[rows] += 1.0
        other.head.bias[rows] -= 1.0
    for name in SAMPLERS:
        run_it = lambda m: sample_loop(
            fn(m), x, diffusion, 4, name, generator=torch.Generator().manual_seed(2)
        )[0]
        if name in ('euler', 'heun'):
            one_line_exit(lambda: run_it(model), 'flow')
            continue
        out = run_it(model)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 0.1, name
        assert torch.equal(out, run_it(other)), name


def test_official_layout_errors_are_one_line(tmp_path):
    load = lambda p: checkpoint.load_model(p, CPU)
    not_dit = str(tmp_path / 'resnet.pt')
    torch.save({'conv1.weight': torch.randn(8, 3, 3, 3), 'fc.weight': torch.randn(10, 8)}, not_dit)
    one_line_exit(lambda: load(not_dit), not_dit, 'bare state_dict', 'no DiT')

    def wrong_qkv(sd):
        sd['blocks.1.attn.qkv.weight'] = torch.randn(3 * 64 + 3, 64)
        sd['blocks.1.attn.qkv.bias'] = torch.randn(3 * 64 + 3)

    cases = {
        'lacks blocks.1.mlp.fc2.bias': lambda sd: sd.pop('blocks.1.mlp.fc2.bias'),
        'no place for (blocks.0.attn.q_norm.weight': lambda sd: sd.update(
            {'blocks.0.attn.q_norm.weight': torch.ones(64)}
        ),
        'blocks.1.attn.qkv.weight is (195, 64), (192, 64) expected': wrong_qkv,
    }
    for i, (words, edit) in enumerate(cases.items()):
        path, _ = official_file(tmp_path, seed=10 + i, edit=edit)
        one_line_exit(lambda: load(path), path, words)
    # a width no DiT size has (not the paper's, not 64-wide heads)
    path, _ = official_file(tmp_path, (16, 4, 3, 96, 1, 12, True), seed=20)
    one_line_exit(lambda: load(path), path, '96 wide', 'matches no DiT size')
    # through sample.py, as a user meets it
    one_error_line(
        run(['sample.py', f'--weights={not_dit}', f'--out_dir={tmp_path}'], check=False), 'no DiT'
    )


def test_sample_py_samples_official_weights_and_writes_the_npz(tmp_path):
    path, _ = official_file(tmp_path)
    out = tmp_path / 'out'
    args = ['sample.py', f'--weights={path}', f'--out_dir={out}', '--steps=2', '--device=cpu']
    run(args + [f'--save_dir={out}/s', '--num_samples=3', '--npz=True'])
    # ADM's evaluator's batch: uint8 [N, H, W, 3], the PNGs as written
    batch = np.load(out / 's.npz')['arr_0']
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.uint8
    files = json.loads((out / 's' / 'samples.json').read_text())['files']
    for image, name in zip(batch, files):
        assert np.array_equal(image, np.asarray(Image.open(out / 's' / name).convert('RGB')))
    run(args + ['--per_class=1'])
    assert (out / 'grid.png').exists()
    one_error_line(run(args + ['--npz=True'], check=False), '--npz=True', '--save_dir')


def test_hub_ids_are_what_is_no_local_path(tmp_path, monkeypatch):
    assert dit_weights.is_hub_id('facebook/DiT-XL-2-256')
    assert not dit_weights.is_hub_id('out-dit/ckpt.pt') and not dit_weights.is_hub_id('ckpt.pt')
    (tmp_path / 'owner' / 'name').mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not dit_weights.is_hub_id('owner/name') and dit_weights.is_diffusers('owner/name')


# -----------------------------------------------------------------------------
# diffusers' layout


def diffusers_dit(heads, head_dim, channels, out, depth, size, patch, classes, eps=1e-5, seed=0):
    """A random DiTTransformer2DModel as a converted checkpoint has it: every block's copy of the
    timestep MLP and label table the same."""
    d = require('diffusers')
    torch.manual_seed(seed)
    m = d.DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=out,
        num_layers=depth,
        sample_size=size,
        patch_size=patch,
        num_embeds_ada_norm=classes,
        norm_eps=eps,
    ).eval()
    randomize(m)
    with torch.no_grad():
        for block in m.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    return m


def diffusers_out(m, x, t, y):
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y).sample


DIFFUSERS_SIZES = [(2, 32, 4, 8, 2, 8, 2, 10, 1e-5), (3, 16, 3, None, 3, 16, 4, 5, 1e-6)]


@pytest.mark.parametrize('size', DIFFUSERS_SIZES)
def test_diffusers_layout_is_diffusers_forward(tmp_path, size):
    ref = diffusers_dit(*size)
    ref.save_pretrained(tmp_path / 'dit')
    model = checkpoint.load_model(str(tmp_path / 'dit'), CPU)[0]
    assert model.config.freq_shift == 1 and model.config.mlp_norm_eps == size[-1]
    x, t, y = probe(size[2], size[5], size[7])
    ours, theirs = model(x, t, y).detach(), diffusers_out(ref, x, t, y)
    assert ours.shape == theirs.shape and theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() < 1e-5


def test_diffusers_layout_errors_are_one_line(tmp_path):
    ref = diffusers_dit(*DIFFUSERS_SIZES[0])
    # trained in diffusers: each block's own timestep MLP, which our DiT cannot hold
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    ref.save_pretrained(tmp_path / 'own')
    path = str(tmp_path / 'own')
    one_line_exit(lambda: checkpoint.load_model(path, CPU), 'its own', 'timestep_embedder')
    unet = tmp_path / 'unet'
    unet.mkdir()
    (unet / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DModel'}))
    one_line_exit(lambda: checkpoint.load_model(str(unet), CPU), 'not a class-conditional DiT')
    one_line_exit(lambda: checkpoint.load_model(str(tmp_path), CPU), 'has no config.json')


# -----------------------------------------------------------------------------
# out: our DiTs as diffusers folders


def our_dit(**over):
    args = dict(arch='dit', input_size=8, in_channels=4, num_classes=6, n_head=2, patch_size=2)
    args.update(n_layer=4, n_embd=32, **over)
    torch.manual_seed(0)
    model = randomize(build_model(args).eval())
    config = dict(objective='vp', schedule='cosine', prediction='v', num_timesteps=1000)
    meta = dict(kind='latents', latent_shape=[4, 8, 8], vae='some/vae', num_classes=6)
    meta.update(class_names=[f'c{i}' for i in range(6)], scaling_factor=0.5, shift_factor=0.0)
    return model, dict(model_args=args, config=config, meta=meta, ema=model.state_dict())


@pytest.mark.parametrize(
    'over', [dict(freq_shift=1), dict(freq_shift=1, learn_sigma=True, share=2, mlp_norm_eps=1e-5)]
)
def test_export_is_diffusers_forward_and_reads_back(tmp_path, over):
    d = require('diffusers')
    model, ckpt = our_dit(**over)
    out = str(tmp_path / 'export')
    lines = dit_weights.export_diffusers(ckpt, out, 'ckpt.pt')
    assert lines[0].startswith(f'wrote {out}') and "from_pretrained('some/vae')" in lines[0]
    assert not any('1/127' in line for line in lines)
    theirs = d.DiTTransformer2DModel.from_pretrained(out, subfolder='transformer').eval()
    x, t, y = probe(4, 8, 6)
    ours = model(x, t, y).detach()
    assert (ours - diffusers_out(theirs, x, t, y)).abs().max().item() < 1e-5
    sched = d.DDIMScheduler.from_pretrained(out, subfolder='scheduler')
    assert sched.config.beta_schedule == 'squaredcos_cap_v2'
    assert sched.config.prediction_type == 'v_prediction' and not sched.config.clip_sample
    # read back into ours: the same function, schedule, labels and VAE
    again, diffusion, meta, _ = checkpoint.load_model(out, CPU)
    assert (again(x, t, y) - ours).abs().max().item() < 1e-6
    assert (diffusion.schedule, diffusion.prediction) == ('cosine', 'v')
    assert meta['class_names'] == ckpt['meta']['class_names'] and meta['vae'] == 'some/vae'
    assert meta['scaling_factor'] == 0.5


def test_export_of_paper_frequencies_says_how_far_diffusers_is(tmp_path):
    d = require('diffusers')
    model, ckpt = our_dit()
    lines = dit_weights.export_diffusers(ckpt, str(tmp_path / 'e'), 'ckpt.pt')
    note = next(line for line in lines if '1/127' in line)
    gap = float(note.split('up to ')[1].split()[0])
    theirs = d.DiTTransformer2DModel.from_pretrained(tmp_path / 'e' / 'transformer').eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([999.0, 500.0]), torch.tensor([0, 5])
    real = (diffusers_out(theirs, x, t, y) - model(x, t, y).detach()).abs().max().item()
    # printed to 3 significant digits
    assert real > 1e-3 and abs(gap - real) <= 5e-3 * real
    assert any('null class' in line for line in lines)


def test_export_refusals_are_one_line(tmp_path):
    _, ckpt = our_dit()
    base = ckpt['model_args']
    cases = {
        'UNet': dict(base, arch='unet'),
        'captions': dict(base, text_dim=16),
        'control branch': dict(base, hint_channels=1),
        'guidance-distilled': dict(base, guidance=True),
        'unconditional': dict(base, num_classes=0),
    }
    out = str(tmp_path / 'out')
    for words, args in cases.items():
        bad = dict(ckpt, model_args=args)
        one_line_exit(lambda: dit_weights.export_diffusers(bad, out, 'x.pt'), 'x.pt', words)
    flow = dict(ckpt, config=dict(ckpt['config'], objective='flow'))
    one_line_exit(lambda: dit_weights.export_diffusers(flow, out, 'x.pt'), 'rectified-flow')
    assert not os.path.exists(out)
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep')
    mine = str(tmp_path / 'mine')
    one_line_exit(lambda: dit_weights.export_diffusers(ckpt, mine, 'x.pt'), 'no earlier export')


# -----------------------------------------------------------------------------
# through train.py: fine-tuning public weights, then exporting


@pytest.fixture(scope='module')
def shapes16(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'shapes')
    run(['prepare.py', '--num_train=64', '--num_val=16', '--resolution=16', f'--out_dir={d}'])
    return d


def fine_tune(data, out, init, *extra):
    return run(
        ['train.py', f'--data_dir={data}', f'--out_dir={out}', f'--init_from={init}']
        + TINY
        + VP
        + list(extra)
    )


def test_fine_tune_official_resumes_exactly_and_exports(shapes16, tmp_path):
    d = require('diffusers')
    init, ref = official_file(tmp_path)
    # the official schedule is VP-linear eps: a run set otherwise would train something else
    p = run(
        ['train.py', f'--data_dir={shapes16}', f'--out_dir={tmp_path}/x', f'--init_from={init}']
        + TINY,
        check=False,
    )
    one_error_line(p, init, 'objective=vp in checkpoint vs flow now')
    fine_tune(shapes16, tmp_path / 'a', init, '--max_iters=4')
    fine_tune(shapes16, tmp_path / 'b', init, '--max_iters=2')
    fine_tune(shapes16, tmp_path / 'b', 'resume', '--max_iters=4')
    a, b = weights(tmp_path / 'a'), weights(tmp_path / 'b')
    assert_same_run(a, b)
    assert a['model_args']['learn_sigma'] and a['model_args']['n_embd'] == 64
    # it trained: the prediction half of the head moved from the official weights
    head = ref.state_dict()['final_layer.linear.weight']
    assert not torch.equal(a['model']['head.weight'], head)
    out = tmp_path / 'b' / 'diffusers'
    p = run(['checkpoint.py', str(tmp_path / 'b' / 'ckpt.pt'), '--to=diffusers', str(out)])
    assert p.stdout.startswith(f'wrote {out}') and '1/127' in p.stdout
    theirs = d.DiTTransformer2DModel.from_pretrained(out / 'transformer').state_dict()
    ema = b['ema']
    assert torch.equal(theirs['proj_out_2.weight'], ema['head.weight'])
    assert torch.equal(
        theirs['transformer_blocks.1.attn1.to_v.weight'], ema['blocks.1.attn.qkv.weight'][128:]
    )
    back = checkpoint.load(str(out))
    assert all(torch.equal(back['ema'][k], v) for k, v in ema.items())
    assert dict(back['model_args'], freq_shift=0) == b['model_args']


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def tiny_vae_pipeline(folder):
    """A pipeline folder holding a tiny random VAE in vae/ (diffusers' layout): the dataset is
    encoded with it and the public DiT's pipeline names it."""
    torch.manual_seed(0)
    cfg = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    cfg.sample_size = 16
    vae = AutoencoderKL(cfg)
    (folder / 'vae').mkdir(parents=True)
    types = dict(
        down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2
    )
    (folder / 'vae' / 'config.json').write_text(
        json.dumps(dict(asdict(cfg), _class_name='AutoencoderKL', **types))
    )
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()},
        str(folder / 'vae' / 'diffusion_pytorch_model.safetensors'),
    )
    (folder / 'model_index.json').write_text(json.dumps({'_class_name': 'DiTPipeline'}))


def test_trained_here_samples_in_diffusers_as_ours(tmp_path):
    """A DiT fine-tuned here from diffusers-layout weights, exported: DiTPipeline (and the same
    loop with CFG, as the pipeline runs it) samples what our DDIM samples from the same noise."""
    d = require('diffusers')
    init = tmp_path / 'init'
    tiny_vae_pipeline(init)
    diffusers_dit(2, 16, 4, 8, 2, 8, 2, 12).save_pretrained(init / 'transformer')
    data = str(tmp_path / 'data')
    run(
        [
            'prepare.py',
            '--num_train=32',
            '--num_val=8',
            '--resolution=16',
            f'--vae={init}',
            '--vae_subfolder=vae',
            f'--out_dir={data}',
        ]
    )
    fine_tune(data, tmp_path / 'out', init, '--max_iters=3')
    out = tmp_path / 'out' / 'diffusers'
    p = run(['checkpoint.py', str(tmp_path / 'out' / 'ckpt.pt'), '--to=diffusers', str(out)])
    assert '1/127' not in p.stdout and 'null class' in p.stdout
    model, diffusion, meta, _ = checkpoint.load_model(str(tmp_path / 'out' / 'ckpt.pt'), CPU)
    vae = d.AutoencoderKL.from_pretrained(init, subfolder='vae').eval()
    pipe = d.DiTPipeline.from_pretrained(out, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    latents = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (latents.append(z), decode(z, *a, **k))[1]
    labels, steps = [0, 7], 10
    images = pipe(
        labels,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=steps,
        output_type='pt',
    ).images
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor(labels)
    with torch.no_grad():
        ours = sample_loop(
            guided(model, diffusion, y, 12, 1.0), noise, diffusion, steps, 'ddim', spacing='leading'
        )[0]
        mine = (vae.decode(ours / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert ours.std() > 0.1
    # a random model's x0 predictions near pure noise are large (x / alpha): its DDIM samples reach
    # ~100, so the latents agree to 1e-4 of their scale (the decoded images absolutely)
    assert close(latents[0] * vae.config.scaling_factor, ours)
    assert (images - mine).abs().max().item() < 1e-4
    # with CFG: DiTPipeline's loop, its null class ours (the pipeline's is ImageNet's 1000)
    sched = d.DDIMScheduler.from_pretrained(out, subfolder='scheduler')
    sched.set_timesteps(steps)
    x, both = noise.clone(), torch.tensor(labels + [12, 12])
    with torch.no_grad():
        for t in sched.timesteps:
            eps = pipe.transformer(
                torch.cat([x, x]), timestep=t.expand(4), class_labels=both
            ).sample[:, :4]
            cond, uncond = eps.chunk(2)
            x = sched.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
        ours = sample_loop(
            guided(model, diffusion, y, 12, 4.0), noise, diffusion, steps, 'ddim', spacing='leading'
        )[0]
    assert close(x, ours)


def test_trained_from_scratch_with_diffusers_frequencies_exports_exactly(shapes16, tmp_path):
    """--freq_shift=1 trains diffusers' DiT function from the start: its export computes exactly
    what ours does, with no note; the default (the paper's frequencies) exports with the note."""
    d = require('diffusers')
    args = ['train.py', f'--data_dir={shapes16}'] + TINY + VP + ['--max_iters=2']
    run(args + [f'--out_dir={tmp_path}/paper'])
    run(args + [f'--out_dir={tmp_path}/run', '--freq_shift=1'])
    p = run(['checkpoint.py', f'{tmp_path}/paper/ckpt.pt', '--to=diffusers', f'{tmp_path}/e0'])
    assert '1/127' in p.stdout
    # the trained weights, made of order 1 (2 steps leave the adaLN-Zero outputs near 0)
    path = tmp_path / 'run' / 'ckpt.pt'
    model, _, _, _ = checkpoint.load_model(str(path), CPU)
    ckpt = torch.load(path, weights_only=True)
    ckpt['ema'] = randomize(model).state_dict()
    torch.save(ckpt, path)
    p = run(['checkpoint.py', str(path), '--to=diffusers', f'{tmp_path}/e'])
    assert '1/127' not in p.stdout
    theirs = d.DiTTransformer2DModel.from_pretrained(tmp_path / 'e' / 'transformer').eval()
    x, t, y = probe(3, 16, 12)
    ours = model(x, t, y).detach()
    assert ours.abs().max() > 0.1
    assert (ours - diffusers_out(theirs, x, t, y)).abs().max().item() < 1e-5
