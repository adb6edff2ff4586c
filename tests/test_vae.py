"""vae.py against diffusers' AutoencoderKL: same weights (every parameter perturbed, so that a
GroupNorm at 1/0 or a swapped pair of same-shaped layers can't hide), same numbers, from each
checkpoint layout; tiling; errors; CLI."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vae import AutoencoderKL, load_state_dict_any
from conftest import require

# skips without diffusers; fails instead in CI (conftest.py)
diffusers = require('diffusers')
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


# see conftest.one_thread
pytestmark = pytest.mark.usefixtures('one_thread')


def config(ch=(32, 64), layers=1, groups=8, latent=4, sample_size=32, **kw):
    return dict(
        block_out_channels=ch,
        layers_per_block=layers,
        norm_num_groups=groups,
        latent_channels=latent,
        sample_size=sample_size,
        down_block_types=['DownEncoderBlock2D'] * len(ch),
        up_block_types=['UpDecoderBlock2D'] * len(ch),
        **kw,
    )


def reference(seed=0, **cfg):
    """A diffusers AutoencoderKL with every parameter moved off its init by ~10% of its own
    spread."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            scale = p.std() if p.numel() > 1 and p.std() > 0 else torch.tensor(1.0)
            p.add_(0.1 * scale * torch.randn_like(p))
    return ref


def assert_same(ref, ours, x, z):
    """encode mean/logvar and decode, untiled, to within TOL (max abs)."""
    with torch.no_grad():
        pr, po = ref.encode(x).latent_dist, ours.encode(x, tiled=False)
        for a, b in ((pr.mean, po.mean), (pr.logvar, po.logvar), (pr.std, po.std)):
            assert (a - b).abs().max() < TOL
        assert (ref.decode(z).sample - ours.decode(z, tiled=False)).abs().max() < TOL


def inputs(cfg, size=32, batch=2):
    g = torch.Generator().manual_seed(1)
    f = 2 ** (len(cfg['block_out_channels']) - 1)
    return (
        torch.randn(batch, 3, size, size, generator=g),
        torch.randn(batch, cfg['latent_channels'], size // f, size // f, generator=g),
    )


# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name,cfg,size',
    [
        ('small', config(), 32),
        ('groups32', config(groups=32), 32),
        # real SD/SDXL/FLUX sizes
        ('sd', config(ch=(128, 256, 512, 512), layers=2, groups=32, sample_size=512), 64),
        (
            'flux-like',
            config(
                latent=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=0.3611,
                shift_factor=0.1159,
            ),
            32,
        ),
    ],
)
def test_matches_diffusers(tmp_path, name, cfg, size):
    ref = reference(**cfg)
    # config.json + diffusion_pytorch_model.safetensors
    ref.save_pretrained(tmp_path)
    assert (tmp_path / 'diffusion_pytorch_model.safetensors').exists()
    ours = AutoencoderKL.from_pretrained(str(tmp_path))
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.config.scaling_factor == ref.config.scaling_factor
    assert ours.config.shift_factor == (ref.config.shift_factor or 0.0)
    assert (ours.quant_conv is None) == (not cfg.get('use_quant_conv', True))
    x, z = inputs(cfg, size, batch=1 if name == 'sd' else 2)
    assert_same(ref, ours, x, z)


def test_bin_weights_and_no_mid_attention(tmp_path):
    cfg = config(mid_block_add_attention=False)
    ref = reference(**cfg)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / 'diffusion_pytorch_model.bin').exists()
    ours = AutoencoderKL.from_pretrained(str(tmp_path))
    assert not any('attentions' in k for k in ours.state_dict())
    assert_same(ref, ours, *inputs(cfg))


def test_subfolder(tmp_path):
    cfg = config()
    ref = reference(**cfg)
    ref.save_pretrained(tmp_path / 'vae')
    (tmp_path / 'model_index.json').write_text('{}')
    with pytest.raises(SystemExit, match="subfolder='vae'"):
        AutoencoderKL.from_pretrained(str(tmp_path))
    assert_same(ref, AutoencoderKL.from_pretrained(str(tmp_path), subfolder='vae'), *inputs(cfg))


# -----------------------------------------------------------------------------
# legacy layouts: the same weights under older names


def to_old_attention(sd):
    names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    return {
        re.sub(
            r'attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.',
            lambda m: f'attentions.0.{names[m[1]]}.',
            k,
        ): v
        for k, v in sd.items()
    }


def to_ldm(sd, n_levels):
    """diffusers -> LDM/CompVis keys (the inverse of what we test), as inside a full SD
    checkpoint."""
    attn = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}
    # non-VAE keys must be dropped
    out = {
        'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(1),
        'first_stage_model.loss.logvar': torch.zeros(1),
    }
    for k, v in sd.items():
        k = k.replace('conv_norm_out', 'norm_out').replace('conv_shortcut', 'nin_shortcut')
        k = re.sub(r'down_blocks\.(\d+)\.resnets\.', r'down.\1.block.', k)
        k = re.sub(r'down_blocks\.(\d+)\.downsamplers\.0\.', r'down.\1.downsample.', k)
        k = re.sub(
            r'up_blocks\.(\d+)\.resnets\.', lambda m: f'up.{n_levels - 1 - int(m[1])}.block.', k
        )
        k = re.sub(
            r'up_blocks\.(\d+)\.upsamplers\.0\.',
            lambda m: f'up.{n_levels - 1 - int(m[1])}.upsample.',
            k,
        )
        k = re.sub(r'mid_block\.resnets\.(\d)\.', lambda m: f'mid.block_{int(m[1]) + 1}.', k)
        m = re.search(r'mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.', k)
        if m:
            k = k.replace(m[0], f'mid.attn_1.{attn[m[1]]}.')
            if k.endswith('weight') and m[1] != 'group_norm':
                # LDM's attention projections are 1x1 convs
                v = v[:, :, None, None]
        out['first_stage_model.' + k] = v
    return out


def test_ldm_inverse_agrees_with_diffusers_converter():
    # our test's to_ldm is right iff diffusers' own LDM converter undoes it; then our converter must
    # agree
    cfg = config(ch=(32, 48, 64))
    sd = reference(**cfg).state_dict()
    ldm = to_ldm(sd, 3)
    theirs = convert_ldm_vae_checkpoint(ldm, cfg)
    ours = load_state_dict_any(ldm)
    assert set(theirs) == set(sd) == set(ours)
    for k in sd:
        assert torch.equal(theirs[k], sd[k]) and torch.equal(ours[k], sd[k]), k


@pytest.mark.parametrize('layout', ['old_attention_folder', 'ldm_safetensors', 'ldm_ckpt'])
def test_legacy_layouts(tmp_path, layout):
    cfg = config(ch=(32, 48, 64), scaling_factor=0.5)
    ref = reference(**cfg)
    sd = ref.state_dict()
    if layout == 'old_attention_folder':
        ref.save_pretrained(tmp_path)
        save_file(
            {k: v.contiguous() for k, v in to_old_attention(sd).items()},
            str(tmp_path / 'diffusion_pytorch_model.safetensors'),
        )
        ours = AutoencoderKL.from_pretrained(str(tmp_path))
    else:
        ldm = to_ldm(sd, 3)
        if layout == 'ldm_safetensors':
            path = str(tmp_path / 'vae.safetensors')
            save_file({k: v.contiguous() for k, v in ldm.items()}, path)
        else:
            path = str(tmp_path / 'model.ckpt')
            torch.save({'state_dict': ldm, 'global_step': 7}, path)
        # a single file has no config: the architecture is read off the weights, groups/scaling are
        # given
        ours = AutoencoderKL.from_pretrained(
            path, config={'norm_num_groups': 8, 'scaling_factor': 0.5}
        )
        assert ours.config.block_out_channels == (32, 48, 64) and ours.config.layers_per_block == 1
    assert ours.config.scaling_factor == 0.5
    assert_same(ref, ours, *inputs(cfg))


def test_single_file_defaults_to_sd_config(tmp_path):
    # an SD-shaped LDM file with no config at all: SD's groups (32) and scaling factor (0.18215)
    cfg = config(ch=(32, 64), groups=32)
    ref = reference(**cfg)
    path = str(tmp_path / 'vae.pt')
    torch.save(to_ldm(ref.state_dict(), 2), path)
    ours = AutoencoderKL.from_pretrained(path)
    assert ours.config.scaling_factor == 0.18215 and ours.config.norm_num_groups == 32
    assert_same(ref, ours, *inputs(cfg))


# -----------------------------------------------------------------------------
# tiling


def tiny_tiles(model, sample=32, latent=16):
    model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor = (
        sample,
        latent,
        0.25,
    )


def test_tiled_matches_diffusers():
    cfg = config()
    ref = reference(**cfg)
    ref.enable_tiling()
    ours = AutoencoderKL(cfg).load_weights(ref.state_dict())
    tiny_tiles(ref), tiny_tiles(ours)
    g = torch.Generator().manual_seed(2)
    # not a multiple of the stride: narrow edge tiles too
    x = torch.randn(2, 3, 80, 72, generator=g)
    z = torch.randn(2, 4, 40, 36, generator=g)
    with torch.no_grad():
        # auto: 80 > 32 switches tiling on
        pr, po = ref.encode(x).latent_dist, ours.encode(x)
        assert po.mean.shape == pr.mean.shape == (2, 4, 40, 36)
        assert (pr.mean - po.mean).abs().max() < TOL and (pr.logvar - po.logvar).abs().max() < TOL
        dr, do = ref.decode(z).sample, ours.decode(z)
        assert do.shape == dr.shape == (2, 3, 80, 72)
        assert (dr - do).abs().max() < TOL
        # and tiling really happened: untiled differs
        assert (ours.encode(x, tiled=False).mean - po.mean).abs().max() > 1e-2


def test_tiled_close_to_untiled_away_from_seams():
    # GroupNorm statistics are per tile, so tiled != untiled anywhere; on a periodic texture (every
    # tile has the whole image's statistics) what is left is the tiles' missing context, which shows
    # at the seams
    cfg = config()
    ours = AutoencoderKL(cfg).load_weights(reference(**cfg).state_dict())
    # encode: latent tiles start every 24, blended over 8; decode: 48 and 16 pixels
    tiny_tiles(ours, 64, 32)
    g = torch.Generator().manual_seed(3)
    x, z = (
        torch.randn(1, 3, 16, 16, generator=g).repeat(1, 1, 8, 8),
        torch.randn(1, 4, 8, 8, generator=g).repeat(1, 1, 8, 8),
    )
    with torch.no_grad():
        pairs = [
            (ours.encode(x).mean, ours.encode(x, tiled=False).mean, 24, 8),
            (ours.decode(z), ours.decode(z, tiled=False), 48, 16),
        ]
    for tiled, untiled, start, width in pairs:
        # per column, relative
        err = (tiled - untiled).abs().mean(dim=(0, 1, 2)) / untiled.abs().mean()
        assert err.mean() < 0.1
        # seam vs first tile's interior
        assert err[start : start + width].mean() > 1.5 * err[: start - width].mean()


def test_tiled_memory_is_bounded():
    # the encoder/decoder only ever see one tile, whatever the image size (what bounds memory at
    # 2048 px)
    cfg = config()
    ours = AutoencoderKL(cfg).load_weights(reference(**cfg).state_dict())
    seen = []
    for m in (ours.encoder, ours.decoder):
        m.register_forward_hook(lambda mod, inp, out: seen.append(max(inp[0].shape[-2:])))
    with torch.no_grad():
        z = ours.encode(torch.randn(1, 3, 128, 96)).mean
        assert z.shape == (1, 4, 64, 48)
        assert ours.decode(z).shape == (1, 3, 128, 96)
    assert len(seen) > 20 and max(seen) <= 32


# -----------------------------------------------------------------------------


def test_latent_scaling():
    ours = AutoencoderKL(config(scaling_factor=0.3611, shift_factor=0.1159))
    # the posterior unpacks as (mean, std)
    mean, std = ours.encode(torch.randn(1, 3, 32, 32))
    z = ours.to_latent(mean)
    assert torch.allclose(z, (mean - 0.1159) * 0.3611)
    assert torch.allclose(ours.from_latent(z), mean, atol=1e-6)
    s1 = ours.to_latent(mean, std, torch.Generator().manual_seed(0))
    s2 = ours.to_latent(mean, std, torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, z)


def test_bad_input(tmp_path):
    def one_line_error(path, *args, **kw):
        with pytest.raises(SystemExit) as e:
            AutoencoderKL.from_pretrained(path, *args, **kw)
        msg = str(e.value)
        assert msg.startswith('error:') and '\n' not in msg
        return msg

    # no config.json
    assert str(tmp_path) in one_line_error(str(tmp_path))
    # a local path that isn't there: no hub lookup
    assert 'nope' in one_line_error(str(tmp_path / 'nope'))
    ref = reference(**config())
    ref.save_pretrained(tmp_path / 'noweights')
    os.remove(tmp_path / 'noweights' / 'diffusion_pytorch_model.safetensors')
    assert 'diffusion_pytorch_model' in one_line_error(str(tmp_path / 'noweights'))
    ref.save_pretrained(tmp_path / 'mismatch')
    assert 'do not fit' in one_line_error(
        str(tmp_path / 'mismatch'), config={'layers_per_block': 2}
    )
    (tmp_path / 'junk.ckpt').write_bytes(b'not a checkpoint')
    assert 'junk.ckpt' in one_line_error(str(tmp_path / 'junk.ckpt'))


def test_cli_round_trip(tmp_path):
    from PIL import Image

    reference(**config()).save_pretrained(tmp_path / 'vae')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (36, 42, 3), dtype=np.uint8)).save(tmp_path / 'in.png')
    out = tmp_path / 'rt.png'
    r = subprocess.run(
        [
            sys.executable,
            'vae.py',
            f'--image={tmp_path / "in.png"}',
            f'--vae={tmp_path / "vae"}',
            f'--out={out}',
            '--device=cpu',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert r.returncode == 0, r.stderr
    # even sizes: no crop for a 2x VAE
    assert 'psnr' in r.stdout and Image.open(out).size == (42, 36)
