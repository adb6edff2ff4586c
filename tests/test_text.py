"""Tests for prepare.py's caption pre-encoding with tiny random BERT and CLIP text encoders
(offline)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import encode
import prepare
from conftest import python

ENV = dict(os.environ, TQDM_DISABLE='1')
WORDS = "a red green blue yellow circle square triangle".split()


def run(*args):
    return python(['prepare.py', *args], ROOT, ENV)


def make_bert(folder):
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS)}
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    return folder


def make_clip(folder):
    """CLIP BPE: a char vocab (+ '</w>' word-final forms) and a few merges; enough for the test
    captions."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for ch in 'abcdefghijklmnopqrstuvwxyz':
        vocab[ch], vocab[ch + '</w>'] = len(vocab), len(vocab) + 1
    merges = []
    for a, b in (('r', 'e'), ('re', 'd</w>'), ('c', 'i'), ('ci', 'r')):
        merges.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
    vf, mf = os.path.join(folder, 'v.json'), os.path.join(folder, 'm.txt')
    with open(vf, 'w') as f:
        json.dump(vocab, f)
    with open(mf, 'w') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    CLIPTokenizer(vf, mf).save_pretrained(folder)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module', params=['bert', 'clip'])
def encoder(request, tmp_path_factory):
    return (make_bert if request.param == 'bert' else make_clip)(
        str(tmp_path_factory.mktemp(request.param))
    )


@pytest.fixture(scope='module')
def prepared(encoder, tmp_path_factory):
    """prepare.py on the shapes data (24 train, 4 val, max_len 16), then encode_captions again
    in-process on the same captions (a second subprocess would cost seconds of imports) for the
    determinism check."""
    out = str(tmp_path_factory.mktemp('data') / 'run0')
    p = run(
        '--num_train=24',
        '--num_val=4',
        f'--text_encoder={encoder}',
        '--text_max_len=16',
        '--text_batch=10',
        f'--out_dir={out}',
    )
    assert p.returncode == 0, p.stderr
    again = str(tmp_path_factory.mktemp('again'))
    for split in ('train', 'val'):
        shutil.copy(os.path.join(out, f'{split}_captions.json'), again)
    prepare.encode_captions(again, encoder, 16, 10, 'cpu')
    return out, again


def load(out, name):
    return np.load(os.path.join(out, name + '.npy'))


def direct(encoder, texts, max_len):
    """The encoder called straight through transformers, not through prepare.py."""
    from transformers import AutoTokenizer, CLIPTextModel, AutoModel

    tok = AutoTokenizer.from_pretrained(encoder)
    cls = CLIPTextModel if 'clip' in encoder else AutoModel
    model = cls.from_pretrained(encoder).eval()
    t = tok(texts, padding='max_length', truncation=True, max_length=max_len, return_tensors='pt')
    with torch.no_grad():
        o = model(input_ids=t['input_ids'], attention_mask=t['attention_mask'])
    return o.last_hidden_state.numpy(), t['attention_mask'].bool().numpy(), o.pooler_output.numpy()


def test_formats_and_meta(prepared, encoder):
    out = prepared[0]
    with open(os.path.join(out, 'meta.json')) as f:
        meta = json.load(f)
    assert meta['text_encoder'] == encoder and meta['text_max_len'] == 16 and meta['text_dim'] == 32
    for split, n in (('train', 24), ('val', 4)):
        s, m, p = (load(out, f'{split}_text{x}') for x in ('', '_mask', '_pooled'))
        assert s.dtype == np.float16 and s.shape == (n, 16, 32)
        assert m.dtype == np.bool_ and m.shape == (n, 16)
        assert p.dtype == np.float16 and p.shape == (n, 32)
        assert np.isfinite(s).all() and np.isfinite(p).all()
        # real tokens first, padding after (CLIP: long ones truncated)
        assert m[:, 0].all() and not m[:, -1].all()
    s, m, p = (load(out, f'empty_text{x}') for x in ('', '_mask', '_pooled'))
    assert s.dtype == np.float16 and s.shape == (16, 32) and m.shape == (16,) and p.shape == (32,)
    # just the begin/end tokens
    assert m.dtype == np.bool_ and m.sum() == 2


def test_deterministic(prepared):
    a, b = prepared
    names = [f'{s}_text{x}' for s in ('train', 'val', 'empty') for x in ('', '_mask', '_pooled')]
    for name in names:
        assert np.array_equal(load(a, name), load(b, name)), name


def test_matches_direct_call(prepared, encoder):
    out = prepared[0]
    with open(os.path.join(out, 'train_captions.json')) as f:
        caps = json.load(f)
    s, m, p = direct(encoder, caps, 16)
    assert np.array_equal(load(out, 'train_text_mask'), m)
    np.testing.assert_allclose(load(out, 'train_text').astype(np.float32), s, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(
        load(out, 'train_text_pooled').astype(np.float32), p, atol=2e-3, rtol=2e-3
    )
    # the empty caption, for classifier-free guidance
    s, m, p = direct(encoder, [''], 16)
    assert np.array_equal(load(out, 'empty_text_mask'), m[0])
    np.testing.assert_allclose(
        load(out, 'empty_text').astype(np.float32), s[0], atol=2e-3, rtol=2e-3
    )
    np.testing.assert_allclose(
        load(out, 'empty_text_pooled').astype(np.float32), p[0], atol=2e-3, rtol=2e-3
    )


def test_padding_does_not_matter(encoder):
    tok, model = encode.load_text_encoder(encoder, 'cpu')
    s16, m16, p16 = encode.encode_texts(["a red circle", ""], tok, model, 16, 'cpu')
    s32, m32, p32 = encode.encode_texts(["a red circle", ""], tok, model, 32, 'cpu')
    assert s16.dtype == torch.float32 and s16.shape == (2, 16, 32) and s32.shape == (2, 32, 32)
    assert m16.dtype == torch.bool and p16.shape == (2, 32)
    assert torch.equal(m32[:, :16], m16) and not m32[:, 16:].any()
    assert torch.allclose(s16[m16], s32[:, :16][m16], atol=1e-5)
    assert torch.allclose(p16, p32, atol=1e-5)


def test_masked_mean_pooling_without_pooler(encoder):
    """An encoder that returns no pooler_output: pooled = mean of the real tokens' states."""
    from transformers import AutoModel

    if 'clip' in encoder:
        pytest.skip("CLIP always pools")
    tok, _ = encode.load_text_encoder(encoder, 'cpu')
    model = AutoModel.from_pretrained(encoder, add_pooling_layer=False).eval()
    s, m, p = encode.encode_texts(["a red circle", "a blue square"], tok, model, 16, 'cpu')
    for i in range(2):
        assert torch.allclose(p[i], s[i][m[i]].mean(0), atol=1e-6)


def test_errors(tmp_path):
    enc = make_bert(str(tmp_path / 'bert'))
    src = tmp_path / 'imgs'
    src.mkdir()
    # images, no captions
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(src / f'{i}.png')
    p = run(
        f'--dataset={src}', '--resolution=8', f'--text_encoder={enc}', f'--out_dir={tmp_path / "o"}'
    )
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and 'captions' in lines[0], p.stderr
    assert not os.path.exists(tmp_path / 'o') and not os.path.exists(tmp_path / 'o.tmp')
    # no such encoder: one line, not a traceback
    with pytest.raises(SystemExit) as e:
        encode.load_text_encoder(str(tmp_path / 'nope'), 'cpu')
    assert str(e.value).startswith('error:') and '\n' not in str(e.value)


def test_empty_val_split(tmp_path):
    enc = make_bert(str(tmp_path / 'bert'))
    for split, caps in (('train', ['a red circle'] * 4), ('val', [])):
        with open(tmp_path / f'{split}_captions.json', 'w') as f:
            json.dump(caps, f)
    meta = prepare.encode_captions(str(tmp_path), enc, 8, 3, 'cpu')
    assert meta == dict(text_encoder=enc, text_max_len=8, text_dim=32)
    assert load(tmp_path, 'val_text').shape == (0, 8, 32) and load(
        tmp_path, 'val_text_mask'
    ).shape == (0, 8)
    assert load(tmp_path, 'val_text_pooled').shape == (0, 32) and load(
        tmp_path, 'train_text'
    ).shape == (4, 8, 32)
