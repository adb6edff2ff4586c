"""
Checkpoints: how train.py writes them, how every script reads them, and the file a model is shared
as.

- Reading: torch.load(weights_only=True), so a checkpoint can hold tensors and plain Python values
  (dicts, lists, numbers, strings) and nothing else: a pickled object that would run code is
  refused. Every unreadable or incomplete file is one line naming it and what is wrong.
- Writing: to a temporary file unique to this process, fsynced, then renamed over the old one, so a
  kill or a full disk at any moment leaves the previous checkpoint intact (and no partial file
  behind).
- Sharing: model.safetensors = the EMA weights + model args, diffusion settings and dataset meta as
  JSON metadata (the format the ecosystem shares weights in); sample.py reads it like a ckpt.pt.
      python checkpoint.py out-shapes/ckpt.pt     # -> out-shapes/model.safetensors
  A class-conditional VP DiT also as a diffusers folder (a DiTPipeline's; dit_weights.py):
      python checkpoint.py out-vp/ckpt.pt --to=diffusers out-vp/diffusers
- A training run holds an exclusive lock on its out_dir, so two runs cannot overwrite each other.
"""

import errno
import glob
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch

import distill
import dit_weights
from diffusion import Diffusion
from model import build_model, freeze_base, model_args_from

# what train.py stores; sampling needs only the last four (and the weights)
TRAIN_KEYS = (
    'model',
    'ema',
    'optimizer',
    'scaler',
    'step',
    'best_val',
    'bad_steps',
    'stale',
    'history',
)
MODEL_KEYS = ('model_args', 'config', 'meta')
DIFFUSION_KEYS = ('objective', 'schedule', 'prediction', 'num_timesteps')


@dataclass
class Run:
    """A training run's counters, saved in every checkpoint under these names and restored on
    resume. best_score: best.pt's keep_best score, lower is better (val loss, factor FD or
    -accuracy); stale: evaluations since it last improved (early stopping)."""

    step: int = 0
    best_val: float = math.inf
    bad_steps: int = 0
    stale: int = 0
    history: list = field(default_factory=list)
    best_score: float = math.inf

    @classmethod
    def resumed(cls, ckpt, keep_best):
        """The counters of a checkpoint to resume, for a run that keeps best by keep_best."""
        run = cls(*(ckpt[k] for k in ('step', 'best_val', 'bad_steps', 'stale', 'history')))
        # best.pt's score (one from before keep_best existed kept best by val loss); a run that
        # changed its yardstick starts afresh
        if ckpt['config'].get('keep_best', 'val_loss') == keep_best:
            run.best_score = ckpt.get('best_score', run.best_val)
        else:
            run.stale = 0
        return run

    def restart_best(self):
        """best.pt and early stopping start afresh (a new distillation round: its own best)."""
        self.best_score = math.inf
        self.stale = 0

    def improved(self, score):
        """Keep-best: whether score beats the best so far (then it is the best); else the run has
        gone one more evaluation without improving."""
        better = score < self.best_score
        if better:
            self.best_score = score
            self.stale = 0
        else:
            self.stale += 1
        return better


@dataclass
class Trained:
    """What a train.py checkpoint saves: the network, its EMA, the optimiser and its scaler, the
    objective's own state (distillation: its teacher), the run's counters, what rebuilds the
    network (model_args, the dataset's meta) and the settings (config); saved into out_dir."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    task: object
    run: Run
    model_args: dict
    meta: dict
    config: dict

    def state(self):
        """The checkpoint: tensors and plain values only (load refuses anything else)."""
        weights = {'model': self.model.state_dict(), 'ema': self.ema.state_dict()}
        opt = {'optimizer': self.optimizer.state_dict(), 'scaler': self.scaler.state_dict()}
        info = {'model_args': self.model_args, 'config': self.config, 'meta': self.meta}
        return {**weights, **opt, **vars(self.run), **info, **self.task.state_dict()}

    def save(self, name):
        save(self.state(), os.path.join(self.config['out_dir'], name))


def restore(ckpt, path, model, ema, optimizer, scaler, task):
    """A checkpoint's weights and optimizer state into a resumed run, or one line if they do not
    fit."""
    try:
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        task.load_state_dict(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = (str(e).splitlines() or [''])[0][:160]
        _fail(path, f"has weights or optimizer state that do not fit this model ({first})")


def atomic_write(path, write):
    """write(f) into `path` atomically: a temporary file beside it, fsynced, then renamed over it. A
    failure at any point (a kill, a full disk) leaves the old file byte-identical and removes the
    partial one."""
    # unique per process: two writers never share a temporary file
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            # on disk before the rename, so even a power cut cannot leave a torn file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SystemExit(
                f"error: disk full writing {path}: the previous file there is intact; "
                f"free some space, then resume"
            ) from None
        if isinstance(e, OSError):
            raise SystemExit(f"error: cannot write {path} ({e.strerror or e})") from None
        raise


def save(ckpt, path):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def remove_stale_temporaries(folder):
    """Temporary files of writers that were killed (ours end in .<pid>.tmp). Call with the out_dir
    lock held."""
    for path in glob.glob(os.path.join(glob.escape(folder), '*.tmp')):
        os.remove(path)


# open for the life of the process: the kernel drops the lock when the process dies
_lock_file = None


def lock_out_dir(folder):
    """An exclusive lock on out_dir for this process: a second training run there stops with one
    line naming the holder. A lock left by a killed run does not block (flock locks die with their
    process)."""
    global _lock_file
    try:
        import fcntl
    # not POSIX (Windows): no lock, the rest works
    except ImportError:
        return
    path = os.path.join(folder, 'train.lock')
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or 'unknown'
        f.close()
        raise SystemExit(
            f"error: out_dir '{folder}' is in use by another training run (pid {holder}): "
            f"wait for it to finish, or pass another --out_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _lock_file = f


def _fail(path, why):
    raise SystemExit(f"error: {path} {why}")


def load(path, device='cpu', training=False):
    """A checkpoint as a dict: a train.py ckpt.pt/best.pt, or a model.safetensors export (EMA
    weights only), or a public DiT (dit_weights: an official .pt, a diffusers folder or hub id).
    training=True: everything a resume needs must be there too."""
    if dit_weights.is_diffusers(path):
        return dit_weights.read_diffusers(path, device)
    if not os.path.isfile(path):
        _fail(path, "does not exist: train first, or pass --out_dir=<the training out_dir>")
    if path.endswith('.safetensors'):
        return _load_safetensors(path, device, training)
    try:
        # torch warns about odd pickle protocols before refusing them
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location=device, weights_only=True)
    # zero bytes, truncated, random bytes, text, a pickle with code: all end here
    except Exception as e:
        # a class or function to import and call: the way a pickle runs code
        if 'GLOBAL' in str(e):
            _fail(
                path,
                "holds pickled objects other than tensors and plain values (refused: loading them "
                "could "
                "run code); only load checkpoints written by train.py",
            )
        msg = [l for l in str(e).splitlines() if 'error' in l.lower() or 'failed' in l.lower()][
            -1:
        ] or [type(e).__name__]
        _fail(path, f"is not a readable checkpoint: truncated or corrupt ({msg[0].strip()[:100]})")
    if not isinstance(ckpt, dict):
        _fail(path, f"is not a train.py checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    # an official facebookresearch/DiT checkpoint (or one line)
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()) and not training:
        return dit_weights.read_official(path, ckpt)
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        _fail(
            path,
            "is a bare state_dict (weights only, no model_args/config): it cannot be rebuilt; "
            "use a train.py ckpt.pt or a model.safetensors export",
        )
    need = MODEL_KEYS + (TRAIN_KEYS if training else ('ema', 'model'))
    missing = [k for k in need if k not in ckpt]
    if missing:
        _fail(path, f"is not a complete train.py checkpoint: missing {', '.join(missing)}")
    check_model_keys(path, ckpt)
    return ckpt


def check_model_keys(path, ckpt):
    """The parts every checkpoint (either format) has must have the right kinds of values."""
    for k in MODEL_KEYS:
        if not isinstance(ckpt[k], dict):
            _fail(path, f"has a broken '{k}' (a {type(ckpt[k]).__name__}, not a dict)")
    missing = [k for k in DIFFUSION_KEYS if k not in ckpt['config']] + [
        k for k in ('arch',) if k not in ckpt['model_args']
    ]
    if missing:
        _fail(path, f"lacks the settings {', '.join(missing)}: it was not written by this train.py")


def check_same_model(path, ckpt, now):
    """A checkpoint to resume or build on has the settings `now` (model args, data shape,
    diffusion), or one line names those that differ: resuming or fine-tuning on another model would
    silently train something else."""
    before = dict(ckpt['config'], **ckpt['model_args'], vae=ckpt['meta'].get('vae'))
    differ = {k: (before.get(k, 0), v) for k, v in now.items() if before.get(k, 0) != v}
    if differ:
        _fail(
            path,
            "is a different model: "
            + ', '.join(f"{k}={a} in checkpoint vs {b} now" for k, (a, b) in differ.items()),
        )


def load_base(model, ckpt, path, new, lacks=False):
    """A base checkpoint's EMA weights into `model`, which extends it by the parameters named `new`*
    (a control branch, a student's CFG-scale input); lacks: the base must not have them already.
    Anything else that does not fit: one line."""
    try:
        missing, unexpected = model.load_state_dict(ckpt['ema'], strict=False)
        wrong = (
            [k for k in missing if not k.startswith(new)]
            + unexpected
            + [f"{new}* already there"] * (lacks and not missing)
        )
    # a tensor of another shape
    except RuntimeError as e:
        wrong = [' '.join(str(e).split())]
    if wrong:
        _fail(path, f"has weights that do not fit a base model: {', '.join(wrong)[:200]}")


def _load_safetensors(path, device, training):
    if training:
        _fail(path, "holds only the EMA weights (an export): resume from the ckpt.pt it came from")
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(path, 'pt') as f:
            info = f.metadata() or {}
        weights = load_file(path, device=str(device))
        extra = {k: json.loads(info[k]) for k in MODEL_KEYS}
    except (SafetensorError, OSError, ValueError) as e:
        _fail(
            path, f"is not a readable safetensors file ({(str(e).splitlines() or [''])[0][:120]})"
        )
    except KeyError as e:
        _fail(path, f"has no {e} metadata: it was not exported by checkpoint.py")
    extra['model_args'] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in extra['model_args'].items()
    }
    ckpt = dict(extra, ema=weights)
    check_model_keys(path, ckpt)
    return ckpt


def export_safetensors(ckpt, path):
    """The EMA weights of a checkpoint as model.safetensors, with everything sampling needs as
    metadata."""
    from safetensors.torch import save

    meta = {k: json.dumps(ckpt[k]) for k in ('model_args', 'meta')}
    meta['config'] = json.dumps(
        {k: v for k, v in ckpt['config'].items() if k in DIFFUSION_KEYS + ('data_dir', 'student')}
    )
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt['ema'].items()}
    atomic_write(path, lambda f: f.write(save(weights, metadata=meta)))


def load_model(path, dev, use_ema=True):
    """Rebuild the denoiser from a checkpoint (ckpt.pt or model.safetensors); returns (model,
    diffusion, meta, config)."""
    ckpt = load(path, dev)
    which = 'ema' if use_ema else 'model'
    if which not in ckpt:
        _fail(path, f"has no '{which}' weights (an export holds only the EMA): use --use_ema=True")
    try:
        model = build_model(ckpt['model_args'])
    except (TypeError, ValueError) as e:
        _fail(path, f"has model_args this code cannot build ({e})")
    except SystemExit as e:
        _fail(path, f"has model_args this code cannot build ({str(e).removeprefix('error: ')})")
    try:
        model.load_state_dict(ckpt[which])
    except (RuntimeError, TypeError, AttributeError) as e:
        _fail(
            path,
            "holds weights that do not fit its model_args "
            f"({(str(e).splitlines() or [''])[0][:160]})",
        )
    c = ckpt['config']
    try:
        diffusion = Diffusion(*(c[k] for k in DIFFUSION_KEYS))
    except (AssertionError, ValueError, TypeError) as e:
        _fail(path, f"has unusable diffusion settings ({e})")
    return model.to(dev).eval(), diffusion, ckpt['meta'], c


# python checkpoint.py out/ckpt.pt [out/model.safetensors]
def starting_point(cfg, meta, shape, num_classes, text_dim, dev):
    """train.py's run: -> (checkpoint, its path, model_args): what it starts from (no checkpoint:
    scratch) and the network to build: the run's settings (cfg); resumed, the same; distilling,
    the teacher's network with a CFG-scale input; a control run, the base's with a branch for the
    dataset's hints."""
    init_from, resume = cfg['init_from'], cfg['init_from'] == 'resume'
    path = os.path.join(cfg['out_dir'], 'ckpt.pt') if resume else init_from
    plain = model_args_from(cfg, shape, num_classes, text_dim)
    if init_from == 'scratch':
        return None, path, plain
    ckpt = load(path, dev, training=resume)
    model_args = plain
    if cfg['distill_steps']:
        model_args = ckpt['model_args']
        if not resume:
            first, conditional = cfg['distill_steps'][0], bool(num_classes or text_dim)
            teacher_steps = cfg['distill_teacher_steps']
            model_args = distill.student_args(ckpt, path, conditional, first, teacher_steps)
    # fine-tuning a public DiT (dit_weights), or resuming that: its network, as its file has it
    elif dit_weights.is_public(ckpt['model_args']) and not meta.get('hint'):
        model_args = ckpt['model_args']
    elif not resume or ckpt['model_args'].get('hint_channels'):
        if not meta.get('hint'):
            _fail(
                path,
                f"needs hints for a control branch: {cfg['data_dir']} has none "
                "(prepare.py --hint=...)",
            )
        hint_channels, hint_size = meta['hint_shape'][0], meta['hint_shape'][-1]
        model_args = dict(ckpt['model_args'], hint_channels=hint_channels, hint_size=hint_size)
        if model_args['arch'] == 'dit':
            model_args['control_blocks'] = cfg['control_blocks']
    # the same data and diffusion (resumed: the same network), or it would silently train
    # something else
    data_keys = ('input_size', 'in_channels', 'num_classes', 'text_dim')
    now = {k: plain.get(k, 0) for k in data_keys}
    now.update(vae=meta.get('vae'), **{k: cfg[k] for k in DIFFUSION_KEYS})
    if resume:
        now.update(model_args)
    check_same_model(path, ckpt, now)
    return ckpt, path, model_args


def build(cfg, model_args, ckpt, path, dev):
    """train.py's network. A control run: the base's EMA weights, frozen, and a trainable branch
    that starts as a copy of what it copies (ControlNet); a student: its teacher's weights, and a
    CFG-scale input that starts at zero."""
    model = build_model(model_args).to(dev)
    control = bool(model_args.get('hint_channels'))
    if control:
        freeze_base(model)
    public = dit_weights.is_public(model_args)
    if ckpt and cfg['init_from'] != 'resume' and (control or cfg['distill_steps'] or public):
        new = 'control.' if control else 'g_embed.'
        load_base(model, ckpt, path, new, lacks=control)
        if control:
            model.init_control_from_base()
    # NHWC: the layout cuDNN's tensor-core convolutions run in
    if model_args['arch'] == 'unet' and dev.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    model.grad_checkpoint = cfg['grad_checkpoint']
    return model


if __name__ == '__main__':
    # --to=diffusers: a diffusers DiT folder (dit_weights.export_diffusers) instead
    args = [a for a in sys.argv[1:] if a != '--to=diffusers']
    to_diffusers = len(args) < len(sys.argv) - 1
    if len(args) not in (1, 2) or args[0].startswith('-'):
        sys.exit(
            "usage: python checkpoint.py path/to/ckpt.pt [path/to/model.safetensors]\n"
            "       python checkpoint.py path/to/ckpt.pt --to=diffusers path/to/folder"
        )
    src = args[0]
    default = 'diffusers' if to_diffusers else 'model.safetensors'
    dst = args[1] if len(args) == 2 else os.path.join(os.path.dirname(src), default)
    if to_diffusers:
        print('\n'.join(dit_weights.export_diffusers(load(src), dst, src)))
    else:
        export_safetensors(load(src), dst)
        print(f"wrote {dst} (the EMA weights of {src})")
