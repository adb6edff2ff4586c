"""REPA (repa.py) on tiny randomly initialised vision encoders saved by transformers and loaded by
path (DINOv2, and CLIP's vision tower): the features are the encoder's patch tokens on the DiT's
grid; the loss is the plain one minus the weighted cosine alignment; the frozen encoder gets no
gradient and only the denoiser and projector move; the projector is saved and never used when
sampling; a run resumes exactly; bad settings are one line."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import repa
from conftest import one_error_line
from data import Batch, draw
from diffusion import Denoise, Diffusion
from model import build_model
from test_train import TINY, assert_same_run, data, run, weights

transformers = pytest.importorskip('transformers')
# pytest finds the shared dataset fixture by its name here
assert data
CPU = torch.device('cpu')


def make_dinov2(folder, image_size=32, patch=4):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        image_size=image_size,
        patch_size=patch,
    )
    transformers.Dinov2Model(config).save_pretrained(folder)
    transformers.BitImageProcessor(
        image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]
    ).save_pretrained(folder)
    return str(folder)


def make_clip(folder):
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=24,
        patch_size=8,
    )
    transformers.CLIPVisionModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='module')
def encoders(tmp_path_factory):
    return dict(
        dinov2=make_dinov2(tmp_path_factory.mktemp('dinov2')),
        clip=make_clip(tmp_path_factory.mktemp('clip')),
    )


def tiny_dit(repa_dim):
    args = dict(arch='dit', input_size=32, in_channels=3, num_classes=4, n_head=2)
    args.update(patch_size=4, n_layer=3, n_embd=32, repa_dim=repa_dim, repa_hidden=16)
    torch.manual_seed(1)
    return build_model(args)


@pytest.mark.parametrize('name', ['dinov2', 'clip'])
def test_features_are_the_patch_tokens_on_the_dit_grid(encoders, name):
    enc = repa.Encoder(encoders[name], CPU)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = enc(images, 8)
    # by hand: the encoder's size, its normalisation, its last (size/patch)^2 tokens, resized
    model = transformers.AutoModel.from_pretrained(encoders[name])
    x = F.interpolate((images + 1) / 2, size=(enc.size,) * 2, mode='bicubic', antialias=True)
    # the DINOv2 folder's preprocessor config; the CLIP folder has none: ImageNet's
    mean, std = ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    if name == 'clip':
        mean, std = repa.IMAGENET_MEAN, repa.IMAGENET_STD
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    side = enc.size // enc.patch
    fmap = out[:, -side * side :].transpose(1, 2).reshape(2, -1, side, side)
    if side != 8:
        fmap = F.interpolate(fmap, size=(8, 8), mode='bilinear', antialias=side > 8)
    torch.testing.assert_close(feats, fmap.flatten(2).transpose(1, 2))
    assert feats.shape == (2, 64, repa.encoder_width(encoders[name]))


def test_the_loss_and_what_it_moves(encoders):
    width = repa.encoder_width(encoders['dinov2'])
    model = tiny_dit(width)
    diffusion = Diffusion()
    inner = Denoise(diffusion, 0.0, 10)
    task = repa.Repa(inner, model, repa.Encoder(encoders['dinov2'], CPU), depth=2, weight=0.5)
    batch = Batch(torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4), None, None)
    draws = draw(diffusion, 0, 4, (3, 32, 32), CPU, 0)
    loss = task.loss(model, batch, draws)
    # the plain loss minus 0.5 x the mean cosine of block 2's projected tokens and the features
    seen = []
    hook = model.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out))
    plain = inner.loss(model, batch, draws)
    hook.remove()
    cos = F.cosine_similarity(model.repa(seen[0]), task.encoder(batch.x0, 8), dim=-1).mean()
    torch.testing.assert_close(loss, plain - 0.5 * cos)
    loss.backward()
    encoder = task.encoder.model
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert model.repa[0].weight.grad.abs().sum() > 0
    # the untrained DiT's head is zero: the denoiser's gradient here is the alignment's, through
    # the blocks up to the aligned one
    assert model.patch_embed.weight.grad.abs().sum() > 0
    assert model.blocks[1].adaLN[-1].weight.grad.abs().sum() > 0
    assert model.blocks[2].adaLN[-1].weight.grad.abs().sum() == 0
    # the val loss is the plain one
    assert task.eval_loss(model, batch, draws) == inner.eval_loss(model, batch, draws)


def test_trained_saved_and_never_sampled(encoders, data, tmp_path):
    common = [f'--data_dir={data}', *TINY, f"--repa_encoder={encoders['dinov2']}", '--repa_depth=1']
    a, b = tmp_path / 'a', tmp_path / 'b'
    run(['train.py', f'--out_dir={a}', *common, '--max_iters=4', '--repa_hidden=16'])
    run(['train.py', f'--out_dir={b}', *common, '--max_iters=2', '--repa_hidden=16'])
    p = run(['train.py', f'--out_dir={b}', '--init_from=resume', '--max_iters=4'])
    assert 'at step 2' in p.stdout
    assert_same_run(weights(a), weights(b))
    ckpt = weights(a)
    assert ckpt['model_args']['repa_dim'] == 24 and 'repa.4.weight' in ckpt['ema']
    # the projector moved, the encoder is not in the checkpoint
    assert ckpt['model']['repa.0.weight'].abs().sum() > 0
    assert not any('encoder' in k for k in ckpt['model'])
    # sampling never calls it: other projector weights, the same grid
    sample = ['sample.py', f'--out_dir={a}', '--steps=2', '--per_class=1', '--device=cpu']
    run(sample)
    first = open(a / 'grid.png', 'rb').read()
    ckpt['ema'] = {k: v + 1 if k.startswith('repa.') else v for k, v in ckpt['ema'].items()}
    torch.save(ckpt, a / 'ckpt.pt')
    run(sample)
    assert open(a / 'grid.png', 'rb').read() == first


def test_bad_settings_are_one_line(encoders, data, tmp_path):
    common = ['train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', *TINY, '--max_iters=1']
    p = run(common + [f"--repa_encoder={encoders['dinov2']}", '--arch=unet'], check=False)
    one_error_line(p, '--repa_encoder', 'DiT')
    p = run(common + [f"--repa_encoder={encoders['dinov2']}", '--repa_depth=3'], check=False)
    one_error_line(p, 'a block 1..2')
    p = run(common + [f'--repa_encoder={tmp_path}/nothing', '--repa_depth=1'], check=False)
    one_error_line(p, '--repa_encoder=', 'not a transformers model')
