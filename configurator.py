"""
nanoGPT-style configuration. A script declares its settings as plain module globals, then calls

    config = configure(globals())

which applies, in order, any Python config files named on the command line (`config/shapes.py`)
and any `--key=value` overrides. Values are parsed as Python literals and must have the type of the
default, so a typo fails loudly on one line instead of silently training the wrong model:

    python train.py config/shapes.py --batch_size=32 --lr=3e-4

`--help` (or `-h`) prints the script's docstring's first paragraph and every setting with its
default and the comment above it in the script, then exits.
"""

import ast
import difflib
import io
import sys
import tokenize
import traceback

CONFIG_TYPES = (int, float, bool, str, tuple, list)


def _check(key, value, defaults, where):
    if key not in defaults:
        # a typo gets its nearest key, not the whole list
        close = difflib.get_close_matches(key, defaults, n=1)
        known = (
            f"did you mean --{close[0]}?" if close else f"known keys: {', '.join(sorted(defaults))}"
        )
        sys.exit(f"error: unknown config key '{key}' ({where}); {known}")
    want = type(defaults[key])
    if want is float and type(value) is int:
        # --lr=1 means 1.0
        return float(value)
    if type(value) is not want:
        sys.exit(
            f"error: config key '{key}' ({where}) must be {want.__name__}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def configure(g, argv=None, ignore_unknown_in_files=False, given=None):
    """Apply config files and --key=value overrides to the globals dict `g`; return the config dict.
    ignore_unknown_in_files: skip keys a config file sets that `g` does not have (bench.py reads
    train configs for their model keys only); --key=value overrides are always checked. given: a
    set that gets every key the files and overrides set (a resumed run keeps its saved value of
    the others)."""
    argv = sys.argv[1:] if argv is None else argv
    # settings: lower-case module globals of plain types (UPPER_CASE names are constants, not
    # settings)
    defaults = {
        k: v
        for k, v in g.items()
        if not k.startswith('_') and not k.isupper() and type(v) in CONFIG_TYPES
    }
    if '--help' in argv or '-h' in argv:
        print(help_text(g, defaults))
        sys.exit(0)
    for arg in argv:
        # a config file: plain Python that assigns some of the keys
        if not arg.startswith('--'):
            try:
                src = open(arg).read()
            except OSError as e:
                sys.exit(f"error: cannot read config file '{arg}': {e.strerror}")
            scope = {}
            try:
                exec(compile(src, arg, 'exec'), scope)
            # a typo in a config file: its file and line, not a traceback
            except Exception as e:
                frames = [
                    f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == arg
                ]
                line = e.lineno if isinstance(e, SyntaxError) else (frames or ['?'])[-1]
                sys.exit(
                    f"error: config file '{arg}' line {line}: "
                    f"{type(e).__name__}: {getattr(e, 'msg', e)}"
                )
            for k, v in scope.items():
                if k.startswith('_') or callable(v) or type(v).__name__ == 'module':
                    continue
                if k in defaults or not ignore_unknown_in_files:
                    g[k] = _check(k, v, defaults, arg)
                    if given is not None:
                        given.add(k)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                sys.exit(f"error: override '{arg}' must look like --key=value")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                # a bare word, e.g. --device=cuda, is a string
                value = text
            if isinstance(defaults.get(key), str):
                # a string key takes the text as written: --out_dir=2024 stays '2024'
                value = text
            g[key] = _check(key, value, defaults, f"--{key}")
            if given is not None:
                given.add(key)
    return {k: g[k] for k in defaults}


# what a resumed run may change and still be the same run: where and how often it reports, not what
# it computes
REPORTING = (
    'log_interval',
    'eval_interval',
    'eval_batches',
    'eval_grade_per_class',
    'sample_steps',
    'wandb_project',
    'wandb_run_id',
    'profile',
    'peak_flops',
)


def resume(g, given, saved, path, step, get_lr):
    """A resumed run's settings: its own (saved: its checkpoint's config), under those the command
    line gives again (given: configure's). A given one that differs is named in one line; one that
    would change what the run computes is refused unless g['force'], since the resumed run would no
    longer be the same run bit for bit. A longer max_iters says what it does to the LR at step
    (get_lr: train.py's, on g). -> {key: (saved value, new value)}."""
    changed = {}
    for key, old in saved.items():
        if key not in g or key in ('init_from', 'out_dir', 'force'):
            continue
        if key not in given:
            g[key] = old
        elif g[key] != old:
            changed[key] = (old, g[key])
    what = ', '.join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
    breaking = [k for k in changed if k not in REPORTING + ('max_iters',)]
    if breaking and not g['force']:
        sys.exit(
            f"error: resuming {path} with other settings than the run's ({what}): it would not "
            f"continue the same run bit for bit; drop --{breaking[0]}, or add --force=True"
        )
    if changed:
        print(f"resuming {path} with changed settings: {what}")
    if breaking:
        print("warning: --force=True: from here on this is not the same run bit for bit")
    if 'max_iters' in changed:
        old_max = changed['max_iters'][0]
        before, after = get_lr(step, iters=old_max), get_lr(step)
        keep = '' if g['lr_decay_iters'] else f" (--lr_decay_iters={old_max} keeps the old one)"
        print(f"max_iters changed: the LR at step {step} goes {before:.2e} -> {after:.2e}{keep}")
    return changed


def setting_comments(path):
    """{name: [comment lines]} for the module-level assignments in the script at path: the block of
    comment lines directly above each one (a `# ---` rule ends it)."""
    try:
        src = open(path).read()
    except (OSError, TypeError):
        return {}
    # comment tokens alone on their line, by line number
    alone = {
        tok.start[0]: tok.string.lstrip('#').strip()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type == tokenize.COMMENT and tok.line.lstrip().startswith('#')
    }
    comments = {}
    for node in ast.parse(src).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        for name in [t.id for t in targets if isinstance(t, ast.Name)]:
            line, block = node.lineno - 1, []
            while line in alone and not alone[line].startswith('---'):
                block.insert(0, alone[line])
                line -= 1
            comments.setdefault(name, block)
    return comments


def help_text(g, defaults):
    """What --help prints: the script's docstring's first paragraph, then each setting as
    --key=default with its comment."""
    intro = (g.get('__doc__') or '').strip().split('\n\n')[0]
    comments = setting_comments(g.get('__file__'))
    lines = [intro, '', "settings (--key=value, or in a config file named on the command line):"]
    for k, v in defaults.items():
        lines.append(f"  --{k}={v!r}")
        lines += [f"      {c}" for c in comments.get(k, [])]
    return '\n'.join(lines)


def check(cfg, positive=(), non_negative=(), fraction=(), choices=None):
    """Range checks on settings, so a harmful value is one line before anything runs, not a climbing
    loss or a NaN in a checkpoint: positive (> 0), non_negative (>= 0), fraction (in [0, 1]),
    choices {key: allowed}."""
    for keys, ok, want in (
        (positive, lambda v: v > 0, 'must be > 0'),
        (non_negative, lambda v: v >= 0, 'must be >= 0'),
        (fraction, lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
    ):
        for k in keys:
            if not ok(cfg[k]):
                sys.exit(f"error: --{k}={cfg[k]!r} {want}")
    for k, allowed in (choices or {}).items():
        if cfg[k] not in allowed:
            sys.exit(f"error: --{k}={cfg[k]!r} is not one of {', '.join(map(repr, allowed))}")
