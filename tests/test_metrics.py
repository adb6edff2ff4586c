"""metrics.py: the Frechet distance against closed forms and scipy, improved precision/recall on
sets of known geometry and against a brute-force reference, the DINOv2 and CLIP loaders on tiny
random transformers models saved to a folder and read back by path, and the CLI end to end (figures,
the reference cache, bad inputs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
from conftest import python, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# nothing here may reach the network
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
WORDS = 'a red circle blue square green triangle'.split()


# see conftest.one_thread
pytestmark = pytest.mark.usefixtures('one_thread')


def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.05 * np.eye(d)


# ---- Frechet distance
# -------------------------------------------------------------------------------------------


def test_fd_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = (
        rng.normal(size=16),
        rng.normal(size=16),
        rng.uniform(0.1, 3, 16),
        rng.uniform(0.1, 3, 16),
    )
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        want, rel=1e-6
    )


def test_fd_matches_scipy_sqrtm_on_full_covariances():
    linalg = require('scipy.linalg')
    rng = np.random.default_rng(1)
    for d in (1, 5, 64):
        mu1, mu2, s1, s2 = (
            rng.normal(size=d),
            rng.normal(size=d),
            random_cov(rng, d),
            random_cov(rng, d),
        )
        want = (
            ((mu1 - mu2) ** 2).sum()
            + np.trace(s1)
            + np.trace(s2)
            - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
        )
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_fd_of_a_set_against_itself_and_its_twin_is_near_zero():
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(8, 8))
    x, y = rng.normal(size=(20000, 8)) @ mix + 3, rng.normal(size=(20000, 8)) @ mix + 3
    stats = metrics.gaussian_stats(x)
    scale = np.trace(stats[1])
    assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-9 * scale
    # two draws: only noise
    assert 0 <= metrics.frechet_distance(*stats, *metrics.gaussian_stats(y)) < 0.01 * scale
    with pytest.raises(ValueError):
        metrics.gaussian_stats(x[:1])


# ---- precision / recall
# -----------------------------------------------------------------------------------------


def brute_force_pr(real, fake, k):
    """Kynkaenniemi et al. 2019 straight from the definition, on the whole distance matrix."""

    def radii(x):
        # column 0: the point itself
        return np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, k]

    def share(points, centres, r):
        return (np.linalg.norm(points[:, None] - centres[None], axis=-1) <= r[None]).any(1).mean()

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_precision_recall_against_brute_force_and_in_chunks(monkeypatch):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(150, 6)), rng.normal(size=(120, 6)) * 0.8 + 0.8
    for k in (1, 3, 5):
        want = brute_force_pr(real, fake, k)
        assert metrics.precision_recall(real, fake, k) == pytest.approx(want, abs=1e-12)
        # a case where both are informative
        assert 0 < want[0] < 1 and 0 < want[1] < 1
    # 7 rows a block, ragged at the end: the same answer
    monkeypatch.setattr(metrics, 'CHUNK', 7 * 150)
    assert metrics.precision_recall(real, fake, 3) == pytest.approx(
        brute_force_pr(real, fake, 3), abs=1e-12
    )


def test_precision_recall_on_known_geometry():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(1000, 8))
    assert metrics.precision_recall(real, real.copy(), 3) == (1.0, 1.0)
    twin = metrics.precision_recall(real, rng.normal(size=(1000, 8)), 3)
    shifted = metrics.precision_recall(real, rng.normal(size=(1000, 8)) + 1.5, 3)
    # off the manifold: both drop
    assert shifted[0] < 0.5 * twin[0] and shifted[1] < 0.5 * twin[1]
    collapsed = metrics.precision_recall(real, real[0] + 0.01 * rng.normal(size=(1000, 8)), 3)
    # all realistic, no diversity: only recall drops
    assert collapsed[0] > 0.99 and collapsed[1] < 0.01
    with pytest.raises(ValueError, match='more than 3'):
        metrics.precision_recall(real[:3], real, 3)


# ---- the encoders, tiny and random, saved and loaded by path
# -----------------------------------------------------


@pytest.fixture(scope='module')
def dino_path(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp('tiny-dinov2'))
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
        )
    ).save_pretrained(path)
    return path


@pytest.fixture(scope='module')
def clip_path(tmp_path_factory):
    """CLIP with a char-level BPE vocab (+ '</w>' word ends) that covers WORDS, and a 32 px vision
    tower."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp('tiny-clip'))
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for ch in 'abcdefghijklmnopqrstuvwxyz':
        vocab[ch], vocab[ch + '</w>'] = len(vocab), len(vocab) + 1
    vf, mf = os.path.join(path, 'v.json'), os.path.join(path, 'm.txt')
    with open(vf, 'w') as f:
        json.dump(vocab, f)
    with open(mf, 'w') as f:
        f.write('#version: 0.2\n')
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(vocab),
                max_position_embeddings=64,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                **tower,
            ),
            vision_config=dict(image_size=32, patch_size=16, **tower),
            projection_dim=16,
        )
    ).save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer(vf, mf)).save_pretrained(
        path
    )
    return path


def pictures(n, seed=0, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(n)
    ]


def test_dinov2_preprocessing_is_dgm_evals():
    # not square: squashed to 224 x 224, no crop
    im = Image.new('RGB', (40, 24), (255, 128, 0))
    x = metrics.dinov2_pixels([im])
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    want = (np.array([255, 128, 0]) / 255 - metrics.IMAGENET_MEAN) / metrics.IMAGENET_STD
    assert torch.allclose(x[0].mean((1, 2)), torch.tensor(want, dtype=torch.float32), atol=1e-5)


def test_dinov2_features_are_the_final_normed_cls_token(dino_path):
    dev = torch.device('cpu')
    model = metrics.load_image_encoder(dino_path, dev)
    images = pictures(3) + pictures(1, seed=1, size=(48, 20))
    f = metrics.dinov2_features(model, images, dev)
    assert f.shape == (4, 32) and f.dtype == np.float32
    # deterministic (eval mode)
    assert np.array_equal(f, metrics.dinov2_features(model, images, dev))
    one_by_one = np.concatenate([metrics.dinov2_features(model, [im], dev) for im in images])
    # no mixing across the batch
    assert np.allclose(f, one_by_one, atol=1e-5)
    with torch.no_grad():
        # Dinov2: layernorm(h)[:, 0]
        pooled = model(pixel_values=metrics.dinov2_pixels(images)).pooler_output
    assert np.allclose(f, pooled.numpy(), atol=1e-6)


def test_clip_cosines_are_the_embeddings_cosines(clip_path):
    dev = torch.device('cpu')
    model, processor = metrics.load_clip(clip_path, dev)
    images, prompts = pictures(12, seed=2), [' '.join(WORDS[i % 7 : i % 7 + 2]) for i in range(12)]
    cos = metrics.clip_cosines(model, processor, images, prompts, dev)
    assert cos.shape == (12,) and np.array_equal(
        cos, metrics.clip_cosines(model, processor, images, prompts, dev)
    )
    with torch.no_grad():
        text = processor.tokenizer(prompts, padding=True, return_tensors='pt')
        pixels = processor.image_processor(images=images, return_tensors='pt')['pixel_values']
        img, txt = (
            model.get_image_features(pixel_values=pixels).pooler_output,
            model.get_text_features(**text).pooler_output,
        )
    want = torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy()
    assert np.allclose(cos, want, atol=1e-6)
    # both sides of the clamp are exercised, so the two conventions differ here
    assert (cos > 0).any() and (cos < 0).any()
    pair, mean = metrics.clip_score(cos, 'pair'), metrics.clip_score(cos, 'mean')
    assert pair > mean and 0 <= pair <= 100


def test_clip_score_conventions_are_their_formulas():
    """On hand-made cosines, some negative: each convention equals its source's formula exactly.
    The values are binary fractions, so 100 * cos and the means are exact in float64."""
    for cos, pair, mean in (
        ([0.5, -0.25, 0.25, -0.125], 18.75, 9.375),
        # the mean below 0: torchmetrics clamps it to 0, the paper's per-pair clamp does not
        ([-0.5, 0.25, -0.25, 0.0], 6.25, 0.0),
        ([0.75, 0.5], 62.5, 62.5),
        ([-0.5, -0.25], 0.0, 0.0),
    ):
        c = np.array(cos)
        # Hessel et al. 2021 (jmhessel/clipscore): w * np.clip(cos, 0, None), then np.mean; w = 100
        paper = np.mean(100 * np.clip(c, 0, None))
        # torchmetrics: score = 100 * cos per pair; compute: torch.max(sum / n, zeros)
        score = 100 * torch.tensor(c)
        tm = torch.max(score.sum(0) / len(c), torch.zeros_like(score.sum(0))).item()
        assert metrics.clip_score(c, 'pair') == paper == pair
        assert metrics.clip_score(c, 'mean') == tm == mean
    with pytest.raises(ValueError, match='clip_clamp'):
        metrics.clip_score(np.zeros(2), 'both')


def test_a_symlink_loop_lists_each_image_once(tmp_path, capsys):
    top = tmp_path / 'samples'
    (top / 'sub').mkdir(parents=True)
    for name in ('a.png', 'b.jpg', 'sub/c.png'):
        Image.new('RGB', (4, 4)).save(top / name)
    (top / 'notes.txt').write_text('not an image')
    # a link to the folder's parent, one to the folder itself, one to a file already listed
    os.symlink(tmp_path, top / 'sub' / 'up')
    os.symlink(top, top / 'self')
    os.symlink(top / 'a.png', top / 'sub' / 'a-again.png')
    found = metrics.list_images(str(top))
    assert found == [str(top / 'a.png'), str(top / 'b.jpg'), str(top / 'sub' / 'c.png')]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith('skipped 2 symlinked folder(s) that loop')
    assert f"{top / 'self'} -> {top.resolve()}" in out[0]
    assert f"{top / 'sub' / 'up'} -> {tmp_path.resolve()}" in out[0]
    # no loop: nothing printed
    (tmp_path / 'plain').mkdir()
    Image.new('RGB', (4, 4)).save(tmp_path / 'plain' / 'd.png')
    assert len(metrics.list_images(str(tmp_path / 'plain'))) == 1 and not capsys.readouterr().out


def test_a_missing_encoder_is_one_line(tmp_path):
    for name, why in (
        (str(tmp_path / 'nope'), 'no such folder'),
        (str(tmp_path), 'cannot load image encoder'),
    ):
        with pytest.raises(SystemExit, match=why) as e:
            metrics.load_image_encoder(name, torch.device('cpu'))
        assert str(e.value.code).startswith('error:') and '\n' not in e.value.code


# ---- the CLI -------------------------------------------------------------------------------------


def run_metrics(*args):
    p = python(['metrics.py', *args], ROOT, ENV, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """A tiny prepare.py shapes dataset (24 val images) and a sample folder as sample.py --save_dir
    writes it: 30 PNGs of other shapes images, one file that is not an image, and samples.json with
    their prompts."""
    base = tmp_path_factory.mktemp('cli')
    data, out = str(base / 'data'), base / 'samples'
    subprocess.run(
        [sys.executable, 'prepare.py', '--num_train=48', '--num_val=24', f'--out_dir={data}'],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
    )
    out.mkdir()
    train = np.load(os.path.join(data, 'train_x.npy'))
    files = []
    for i in range(30):
        files.append(f'{i:03d}.png')
        Image.fromarray(train[i].transpose(1, 2, 0)).save(out / files[-1])
    (out / 'bad.png').write_text('not a png')
    files.append('bad.png')
    prompts = [WORDS[i % len(WORDS)] + ' ' + WORDS[(i + 2) % len(WORDS)] for i in range(len(files))]
    (out / 'samples.json').write_text(
        json.dumps(dict(files=files, labels=[0] * len(files), classes=[], prompts=prompts))
    )
    return data, str(out)


def test_cli_prints_the_figures_and_caches_the_reference(folders, dino_path, clip_path):
    data, out = folders
    args = [f'--samples={out}', f'--reference={data}', f'--encoder={dino_path}', '--batch_size=16']
    first = run_metrics(*args, f'--clip={clip_path}')
    cache = os.path.join(data, f"metrics_val_{dino_path.replace('/', '_').strip('_.')}.npz")
    assert (
        'skipped 1 unreadable sample image(s)' in first and f'features written to {cache}' in first
    )
    assert (
        'FD-DINOv2 ' in first
        and 'N=30 samples vs 24 reference; FD is biased upwards at small N' in first
    )
    assert 'precision ' in first and 'recall ' in first and '(k=3;' in first
    # 30 and 24 images, 32 feature dimensions
    assert (
        'warning: samples (30) and reference (24) fewer than the 32 feature dimensions' in first
        and '--split=train' in first
    )
    assert 'CLIP score ' in first and '30 image-prompt pairs' in first
    assert "(clip_clamp='pair': mean of 100 * max(cos, 0)" in first
    stamp = os.stat(cache).st_mtime_ns
    assert np.load(cache)['features'].shape == (24, 32)

    # the reference features come from the cache, unchanged
    second = run_metrics(*args, f'--clip={clip_path}', '--clip_clamp=mean')
    assert "(clip_clamp='mean': max(mean of 100 * cos, 0)" in second
    assert f'features read from {cache}' in second and os.stat(cache).st_mtime_ns == stamp
    fd_line = [line for line in first.splitlines() if line.startswith('FD-DINOv2')]
    assert fd_line == [line for line in second.splitlines() if line.startswith('FD-DINOv2')]


def test_a_corrupt_or_stale_cache_is_recomputed(folders, dino_path, monkeypatch, capsys):
    data, _ = folders
    path = os.path.join(data, 'metrics_val_test.npz')
    with open(path, 'wb') as f:
        f.write(b'PK\x03\x04 torn')
    assert metrics.read_cache(path, 24, 32) is None and 'unreadable' in capsys.readouterr().out
    np.savez(path, features=np.zeros((23, 32), np.float32))
    assert metrics.read_cache(path, 24, 32) is None and '(23, 32)' in capsys.readouterr().out
    np.savez(path, features=np.ones((24, 32), np.float32))
    assert metrics.read_cache(path, 24, 16) is None and metrics.read_cache(path, 24, 32).shape == (
        24,
        32,
    )


def test_bad_inputs_are_one_line_errors(folders, dino_path, tmp_path):
    """Each case in a fresh copy of the script (runpy), all in one process so torch is imported
    once."""
    data, out = folders
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    (tmp_path / 'badjson').mkdir()
    (tmp_path / 'badjson' / 'samples.json').write_text('{"files": 3}')
    cases = {
        f'--samples={tmp_path}/missing': 'is not a folder',
        f'--samples={tmp_path}/empty': 'no images',
        f'--samples={tmp_path}/badjson': 'samples.json is unreadable or malformed',
        f'--reference={tmp_path}/missing': f'--reference={tmp_path}/missing is not a folder',
        f'--encoder={tmp_path}/no-dinov2': 'no such folder',
        '--encoder=nobody/no-such-model': "cannot load image encoder 'nobody/no-such-model'",
        '--split=test': "has no split 'test'",
        '--k=0': '--k=0 must be > 0',
        '--clip_clamp=both': "--clip_clamp='both' is not one of 'pair', 'mean'",
        f'--samples={tmp_path}/broken --clip={tmp_path}': '--clip needs prompts',
        f'--samples={tmp_path}/broken --encoder={dino_path}': 'none of the 1 images',
    }
    driver = (
        "import runpy, sys\nfor case in sys.argv[1:]:\n    sys.argv = ['metrics.py'] + "
        "case.split()\n"
        "    try:\n        runpy.run_path('metrics.py', run_name='__main__')\n    except "
        "SystemExit as e:\n"
        "        print('EXIT', e.code)\n"
    )
    # a later --key= overrides an earlier one
    argv = [f'--samples={out} --reference={data} {case}' for case in cases]
    p = python(['-c', driver, *argv], ROOT, ENV, timeout=300)
    exits = [line for line in p.stdout.splitlines() if line.startswith('EXIT')]
    assert len(exits) == len(cases), p.stdout + p.stderr
    for line, want in zip(exits, cases.values()):
        assert line.startswith('EXIT error: ') and want in line, (line, want)
