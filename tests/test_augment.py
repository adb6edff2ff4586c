"""augment.py: each transform does what its labels (the network's conditioning) say, measured on
the image independently of how apply() computes it; zero labels leave an image bit for bit as it
was; each transform is applied with its probability and draws only when asked for; a bad setting
is one line."""

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment as A
from conftest import one_line_exit

N, SIZE = 64, 32


def only(name, strength=None, p=1.0, shape=(3, SIZE, SIZE), seed=0):
    spec = {name: (p, A.TRANSFORMS[name][1] if strength is None else strength)}
    g = torch.Generator().manual_seed(seed)
    labels, noise = A.draw(g, N, shape, spec, 'cpu')
    return spec, labels, noise


def blobs():
    """One bright Gaussian blob per image, at a random place near the middle, on black."""
    g = torch.Generator().manual_seed(1)
    centre = (torch.rand(N, 2, generator=g) - 0.5) * 0.6
    coords = (torch.arange(SIZE) + 0.5) / SIZE * 2 - 1
    dx = coords.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)
    x = torch.exp(-(dx**2 + dy**2) / (2 * 0.08**2))
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), centre


def centroid(x):
    coords = (torch.arange(SIZE) + 0.5) / SIZE * 2 - 1
    w = x[:, 0].clamp_min(0)
    total = w.sum((1, 2))
    return torch.stack(
        [(w * coords.view(1, 1, -1)).sum((1, 2)), (w * coords.view(1, -1, 1)).sum((1, 2))], 1
    ) / total.view(-1, 1)


def angle(label):
    return torch.atan2(label[:, 1], label[:, 0] + 1)


def test_zero_labels_leave_images_bit_for_bit():
    x = torch.rand(N, 3, SIZE, SIZE) * 2 - 1
    spec = {k: (1.0, v[1]) for k, v in A.TRANSFORMS.items()}
    assert torch.equal(A.apply(x, torch.zeros(N, A.AUG_DIM), None, spec), x)
    # and each transform's labels sit in its own columns, zero elsewhere
    for name in A.TRANSFORMS:
        _, labels, _ = only(name)
        lo, hi = A.OFFSET[name], A.OFFSET[name] + A.TRANSFORMS[name][2]
        # all applied (p = 1); a shift that rounds to no pixel is no shift, and labelled so
        assert labels[:, lo:hi].ne(0).any(1).float().mean() > 0.9 and not labels[:, :lo].any()
        assert not labels[:, hi:].any(), name


@pytest.mark.parametrize('name', A.GEOMETRIC)
def test_geometric_transforms_move_a_blob_where_their_labels_say(name):
    x, c = blobs()
    spec, labels, _ = only(name)
    moved = centroid(A.apply(x, labels, None, spec))
    lab = A.part(labels, name)
    px, py = c.unbind(1)
    if name == 'xflip':
        want = torch.stack([-px, py], 1)
    elif name in ('rotate90', 'rotate'):
        a = angle(lab)
        want = torch.stack([px * a.cos() - py * a.sin(), px * a.sin() + py * a.cos()], 1)
    elif name == 'translate':
        want = c + 2 * lab
    elif name == 'scale':
        want = c * lab.exp2()
    else:
        k = lab[:, 0].exp2()
        want = torch.stack([px * k, py / k], 1)
    # the blob near an edge is partly reflected: only those well inside
    inside = want.abs().max(1).values < 0.6
    assert inside.sum() > N // 3
    torch.testing.assert_close(moved[inside], want[inside], atol=0.01, rtol=0)


def test_quarter_turns_and_shifts_are_exact_pixel_moves():
    x = torch.rand(N, 3, SIZE, SIZE)
    spec, labels, _ = only('rotate90')
    out = A.apply(x, labels, None, spec)
    quarters = (angle(A.part(labels, 'rotate90')) / (math.pi / 2)).round().long()
    for i in range(N):
        # +90 degrees in grid_sample's coordinates (y down): clockwise on screen
        torch.testing.assert_close(out[i], torch.rot90(x[i], -int(quarters[i]), (1, 2)))
    spec, labels, _ = only('translate', 0.25)
    out = A.apply(x, labels, None, spec)
    shift = (A.part(labels, 'translate') * SIZE).round().long()
    for i in range(N):
        dx, dy = shift[i].tolist()
        inner = out[i, :, max(dy, 0) : SIZE + min(dy, 0), max(dx, 0) : SIZE + min(dx, 0)]
        src = x[i, :, max(-dy, 0) : SIZE + min(-dy, 0), max(-dx, 0) : SIZE + min(-dx, 0)]
        torch.testing.assert_close(inner, src)


def test_colour_transforms_do_what_their_labels_say():
    x = torch.rand(N, 3, SIZE, SIZE) * 1.6 - 0.8
    spec, labels, _ = only('brightness')
    b = A.part(labels, 'brightness').view(-1, 1, 1, 1)
    torch.testing.assert_close(A.apply(x, labels, None, spec), x + b)
    spec, labels, _ = only('contrast')
    c = A.part(labels, 'contrast').exp2().view(-1, 1, 1, 1)
    torch.testing.assert_close(A.apply(x, labels, None, spec), x * c)
    grey = x.mean(1, keepdim=True)
    off = x - grey
    # saturation scales the colour off the grey axis, keeps the grey part
    spec, labels, _ = only('saturation')
    s = A.part(labels, 'saturation').exp2().view(-1, 1, 1, 1)
    torch.testing.assert_close(A.apply(x, labels, None, spec), grey + s * off)
    # hue turns the colour about the grey axis by the labelled angle
    spec, labels, _ = only('hue')
    out = A.apply(x, labels, None, spec)
    turned = out - out.mean(1, keepdim=True)
    torch.testing.assert_close(out.mean(1, keepdim=True), grey)
    torch.testing.assert_close(turned.norm(dim=1), off.norm(dim=1))
    cos = (turned * off).sum(1) / (turned.norm(dim=1) * off.norm(dim=1))
    want = angle(A.part(labels, 'hue')).cos().view(-1, 1, 1).expand_as(cos)
    torch.testing.assert_close(cos, want, atol=1e-4, rtol=0)


def test_erase_gridmask_and_noise():
    x = torch.rand(N, 3, SIZE, SIZE) + 0.5
    spec, labels, _ = only('erase')
    zeroed = (A.apply(x, labels, None, spec) == 0).all(1).float().mean((1, 2))
    _, _, w, h = A.part(labels, 'erase').unbind(1)
    # the rectangle's area, less what falls outside the image
    assert (zeroed <= w * h + 0.1).all() and (zeroed > 0).all()
    spec, labels, _ = only('gridmask', 0.5)
    zeroed = (A.apply(x, labels, None, spec) == 0).all(1).float().mean((1, 2))
    torch.testing.assert_close(zeroed.mean(), torch.tensor(0.25), atol=0.03, rtol=0)
    spec, labels, noise = only('noise')
    sigma = A.part(labels, 'noise').view(-1, 1, 1, 1)
    torch.testing.assert_close(A.apply(x, labels, noise, spec), x + sigma * noise)


def test_probability_and_what_is_drawn():
    _, labels, _ = only('rotate', p=0.3)
    applied = A.part(labels, 'rotate').ne(0).any(1).float().mean()
    assert 0.15 < applied < 0.45
    # the same generator state: the same draws; another transform added after does not change
    # the ones before it
    a = A.draw(torch.Generator().manual_seed(3), N, (3, 8, 8), {'scale': (0.5, 0.2)}, 'cpu')[0]
    b = A.draw(
        torch.Generator().manual_seed(3), N, (3, 8, 8), {'scale': (0.5, 0.2), 'hue': (1, 1)}, 'cpu'
    )[0]
    assert torch.equal(A.part(a, 'scale'), A.part(b, 'scale'))
    assert A.draw(torch.Generator(), N, (3, 8, 8), {}, 'cpu')[1] is None


def test_the_setting_and_its_bad_values():
    assert A.parse('rotate:0.5, hue:0.25:0.5', False) == {'rotate': (0.5, 1.0), 'hue': (0.25, 0.5)}
    assert A.parse('', False) == {} and A.parse('translate:1', True) == {'translate': (1.0, 0.125)}
    one_line_exit(lambda: A.parse('twist:0.5', False), "unknown transform 'twist'")
    one_line_exit(lambda: A.parse('hue', False), "'hue' must be hue:probability[:strength]")
    one_line_exit(lambda: A.parse('hue:1.5', False), 'probability in [0, 1]')
    one_line_exit(lambda: A.parse('hue:0.5:x', False), "'hue:0.5:x' must be")
    one_line_exit(lambda: A.parse('rotate:0.5', True), 'not meaningful for latent')
    one_line_exit(lambda: A.parse('gridmask:0.5:1', False), "'gridmask' strength must be < 1")


# -----------------------------------------------------------------------------
# in training: the batch, the network's input, resume


def test_the_batch_is_augmented_as_its_draws_say_and_tells_the_network(tmp_path):
    from data import Data, draw
    from diffusion import Diffusion
    from test_train import run

    d = str(tmp_path / 'shapes')
    run(['prepare.py', '--num_train=64', '--num_val=8', '--resolution=16', f'--out_dir={d}'])
    data = Data(d, 'train', torch.device('cpu'))
    spec = A.parse('rotate:0.5,hue:0.5,noise:0.5', False)
    data.augment = spec
    idx = torch.arange(16).numpy()
    diffusion = Diffusion('flow', 'cosine', 'v', 1000)
    draws = draw(diffusion, 5, 16, (3, 16, 16), 'cpu', 0, augment_spec=spec)
    plain = draw(diffusion, 5, 16, (3, 16, 16), 'cpu', 0)
    # the draws before the augmentation's are the same as without it
    assert torch.equal(draws.t, plain.t) and torch.equal(draws.noise, plain.noise)
    batch = data.batch(idx, draws)
    clean, _ = data.get(idx)
    want = A.apply(clean, draws.aug, draws.aug_noise, spec)
    assert torch.equal(batch.x0, want) and torch.equal(batch.aug, draws.aug)
    assert 0 < draws.aug.ne(0).any(1).float().mean() < 1
    # the leak control: augmented, but not told
    data.augment_cond = False
    assert data.batch(idx, draws).aug is None
    assert data.batch(idx, plain).aug is None and torch.equal(data.batch(idx, plain).x0, clean)


@pytest.mark.parametrize('arch', ['dit', 'unet'])
def test_the_network_takes_the_labels_and_samples_with_none(arch):
    from model import build_model

    args = dict(arch=arch, input_size=16, in_channels=3, num_classes=4, n_head=2, aug_dim=A.AUG_DIM)
    args.update(dict(patch_size=4, n_layer=2, n_embd=32) if arch == 'dit' else dict(channels=16))
    torch.manual_seed(0)
    model = build_model(args)
    # a trained-looking network (the untrained one outputs 0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(4, 3, 16, 16), torch.full((4,), 500.0), torch.arange(4)
    labels = torch.randn(4, A.AUG_DIM)
    assert not torch.allclose(model(x, t, y, aug=labels), model(x, t, y))
    # sampling passes no labels: the same as "nothing applied"
    assert torch.equal(model(x, t, y), model(x, t, y, aug=torch.zeros(4, A.AUG_DIM)))


def test_resume_is_exact_with_augmentation(tmp_path):
    from test_train import TINY, assert_same_run, run, weights

    d = str(tmp_path / 'shapes')
    run(['prepare.py', '--num_train=64', '--num_val=8', '--resolution=16', f'--out_dir={d}'])
    common = TINY + [
        f'--data_dir={d}',
        '--eval_interval=0',
        '--augment=rotate:0.5,hue:0.5,noise:0.5',
    ]
    a, b = tmp_path / 'a', tmp_path / 'b'
    run(['train.py', f'--out_dir={a}', *common, '--max_iters=6'])
    run(['train.py', f'--out_dir={b}', *common, '--max_iters=3'])
    p = run(['train.py', f'--out_dir={b}', '--init_from=resume', '--max_iters=6'])
    assert 'at step 3' in p.stdout
    assert_same_run(weights(a), weights(b))
    assert weights(a)['model_args']['aug_dim'] == A.AUG_DIM
    # augmentation changes the run (it is applied): not the same weights as without it
    c = tmp_path / 'c'
    run(['train.py', f'--out_dir={c}', *common[:-1], '--max_iters=6'])
    assert not torch.equal(
        weights(a)['model']['t_embed.0.weight'], weights(c)['model']['t_embed.0.weight']
    )


def test_bench_augment_score_names_a_folder_without_a_checkpoint(tmp_path, monkeypatch):
    import bench_augment

    monkeypatch.setattr(sys, 'argv', ['bench_augment.py'])
    monkeypatch.setattr(bench_augment, 'score', str(tmp_path))
    one_line_exit(bench_augment.main, f"--score={tmp_path} has no ckpt.pt")
