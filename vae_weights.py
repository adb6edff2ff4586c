"""
Reading an AutoencoderKL's weights for vae.py: the files of a diffusers folder or a hub repo, a
single .safetensors/.ckpt/.pt/.bin file, and the older key layouts (LDM/CompVis, diffusers' old
attention names) converted to today's diffusers keys; a single file's architecture is read off its
weight shapes.
"""

import os
import re

import torch


def local_file(folder, name):
    p = os.path.join(folder, name)
    return p if os.path.isfile(p) else None


def hub_file(repo, subfolder, name):
    """Download (or find in the HF cache) one file of a hub repo; None if the repo has no such
    file."""
    # only needed for hub ids
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo, name, subfolder=subfolder or None)
    # offline, bad id, gated repo...: one line, not a traceback
    except Exception as e:
        if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
            # the repo is there, the file is not (e.g. no .safetensors: try .bin)
            return None
        msg = (str(e).strip().splitlines() or [''])[0][:200]
        raise SystemExit(
            f"error: '{repo}' is not a local folder or file, and the Hugging Face hub gave "
            f"{type(e).__name__} for {name}: {msg}"
        )


def read_weights(path):
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file

            return load_file(path)
        # tensors only, no arbitrary pickled code
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(
            f"error: cannot read weights {path} ({type(e).__name__}); "
            f"a .ckpt/.pt/.bin must hold only tensors (torch.load weights_only=True), "
            f"else convert it to .safetensors"
        )
    # LDM .ckpt files nest it
    return sd.get('state_dict', sd) if isinstance(sd, dict) else {}


# (pattern, replacement) for LDM/CompVis keys, applied in order
_LDM_RENAMES = [
    (r'^(encoder|decoder)\.norm_out\.', r'\1.conv_norm_out.'),
    (r'^encoder\.down\.(\d+)\.block\.', r'encoder.down_blocks.\1.resnets.'),
    (r'^encoder\.down\.(\d+)\.downsample\.', r'encoder.down_blocks.\1.downsamplers.0.'),
    (r'^(encoder|decoder)\.mid\.block_1\.', r'\1.mid_block.resnets.0.'),
    (r'^(encoder|decoder)\.mid\.block_2\.', r'\1.mid_block.resnets.1.'),
    (r'^(encoder|decoder)\.mid\.attn_1\.norm\.', r'\1.mid_block.attentions.0.group_norm.'),
    (r'^(encoder|decoder)\.mid\.attn_1\.([qkv])\.', r'\1.mid_block.attentions.0.to_\2.'),
    (r'^(encoder|decoder)\.mid\.attn_1\.proj_out\.', r'\1.mid_block.attentions.0.to_out.0.'),
    (r'\.nin_shortcut\.', '.conv_shortcut.'),
]


def convert_ldm(sd):
    """LDM/CompVis VAE keys -> diffusers keys. LDM numbers decoder levels by resolution (up.0 is the
    full-resolution one, run last), diffusers by execution order (up_blocks.0 runs first), hence the
    flip."""
    n_up = 1 + max(
        (int(m[1]) for k in sd if (m := re.match(r'decoder\.up\.(\d+)\.', k))), default=-1
    )
    flip = lambda m: (
        f'decoder.up_blocks.{n_up - 1 - int(m[1])}.'
        f'{"resnets" if m[2] == "block" else "upsamplers.0"}.'
    )
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^decoder\.up\.(\d+)\.(block|upsample)\.', flip, k)
        for pat, rep in _LDM_RENAMES:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def convert_old_attention(sd):
    """diffusers < 0.14 attention names -> today's; and 1x1-conv attention weights (LDM) ->
    linear."""
    old = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
    out = {}
    for k, v in sd.items():
        k = re.sub(
            r'(\.attentions\.\d+\.)(query|key|value|proj_attn)\.',
            lambda m: m[1] + old[m[2]] + '.',
            k,
        )
        if re.search(r'\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$', k) and v.dim() > 2:
            # [C, C, 1, 1] or [C, C, 1] -> [C, C]
            v = v.flatten(1)
        out[k] = v
    return out


def load_state_dict_any(sd):
    """An AutoencoderKL state dict in any of: diffusers, diffusers with old attention names, or
    LDM/CompVis (optionally inside a full SD checkpoint under first_stage_model. / vae.) -> a new
    dict with diffusers keys."""
    for prefix in ('first_stage_model.', 'vae.'):
        # a whole-pipeline checkpoint: keep the VAE's part
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    # drop what is not the autoencoder (LDM training checkpoints carry loss.discriminator.*,
    # loss.logvar, ...)
    sd = {
        k: v
        for k, v in sd.items()
        if k.startswith(('encoder.', 'decoder.', 'quant_conv.', 'post_quant_conv.'))
    }
    if any(k.startswith(('encoder.down.', 'encoder.mid.')) for k in sd):
        sd = convert_ldm(sd)
    return convert_old_attention(sd)


def infer_config(sd):
    """Architecture keys of a diffusers-keyed state dict, read off its weight shapes
    (norm_num_groups can't be: 32 assumed). KeyError if it is not an AutoencoderKL."""
    n = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('encoder.down_blocks.'))
    return dict(
        in_channels=sd['encoder.conv_in.weight'].shape[1],
        out_channels=sd['decoder.conv_out.weight'].shape[0],
        block_out_channels=[
            sd[f'encoder.down_blocks.{i}.resnets.0.conv1.weight'].shape[0] for i in range(n)
        ],
        layers_per_block=1
        + max(int(k.split('.')[4]) for k in sd if k.startswith('encoder.down_blocks.0.resnets.')),
        latent_channels=sd['decoder.conv_in.weight'].shape[1],
        use_quant_conv='quant_conv.weight' in sd,
        use_post_quant_conv='post_quant_conv.weight' in sd,
        mid_block_add_attention='encoder.mid_block.attentions.0.to_q.weight' in sd,
    )
