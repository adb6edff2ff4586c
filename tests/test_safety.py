"""The corpus of bad entrances: shared checkpoints (malicious, broken), harmful settings, corrupt
datasets, two runs on one out_dir, a full disk. Each must end with exit status != 0, one line
starting 'error:', no traceback, and nothing that existed before lost."""

import errno
import json
import os
import pickle
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench
import checkpoint
import prepare
import sample
import train
from conftest import one_error_line, one_line_exit, python
from data import Data
from model import setup_device

ENV = dict(os.environ, OMP_NUM_THREADS='1', TQDM_DISABLE='1')
TINY = [
    '--patch_size=4',
    '--n_layer=2',
    '--n_head=2',
    '--n_embd=32',
    '--batch_size=8',
    '--lr=1e-3',
    '--warmup_iters=2',
    '--lr_decay_iters=40',
    '--ema_start=1',
    '--ema_decay=0.9',
    '--eval_batches=1',
    '--log_interval=1',
    '--sample_steps=1',
    '--compile=False',
    '--device=cpu',
]


def run(args, **kw):
    return python(args, ROOT, ENV, **kw)


def snapshot(folder):
    return {
        f: open(os.path.join(folder, f), 'rb').read()
        for f in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, f))
    }


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'shapes')
    assert run(['prepare.py', '--num_train=64', '--num_val=8', f'--out_dir={d}']).returncode == 0
    return d


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """A finished 2-step run: ckpt.pt, best.pt and the model.safetensors export."""
    out = str(tmp_path_factory.mktemp('run'))
    p = run(
        ['train.py', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=1']
        + TINY
    )
    assert p.returncode == 0, p.stderr
    assert 'exported the EMA weights' in p.stdout
    return out


# ---------------------------------------------------------------- checkpoints


class RunsCode:
    """Unpickling this runs a shell command: what a malicious shared checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_runs_no_code(data, trained, tmp_path):
    marker = tmp_path / 'pwned'
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    ckpt['config'] = dict(ckpt['config'], evil=RunsCode(marker))
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    # the payload is really in there: plain pickle would run it
    with open(tmp_path / 'ckpt.pt', 'rb') as f:
        assert b'system' in f.read()
    for args in (
        ['sample.py', f'--out_dir={tmp_path}', '--device=cpu', '--steps=1'],
        ['train.py', f'--out_dir={tmp_path}', '--init_from=resume', f'--data_dir={data}'] + TINY,
        ['bench_samplers.py', f'--quality={tmp_path}', '--device=cpu'],
    ):
        p = run(args)
        one_error_line(p, 'ckpt.pt', 'refused')
    assert not marker.exists()


def broken_checkpoints(trained, tmp_path):
    """name -> (bytes or object to torch.save, words the error must contain)."""
    good = open(os.path.join(trained, 'ckpt.pt'), 'rb').read()
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    other = dict(ckpt, model_args=dict(ckpt['model_args'], n_embd=64))
    no_ema = {k: v for k, v in ckpt.items() if k not in ('ema', 'model')}
    return {
        'zero_bytes': (b'', 'not a readable checkpoint'),
        'truncated': (good[: len(good) // 2], 'not a readable checkpoint'),
        'random_bytes': (np.random.default_rng(0).bytes(4096), 'not a readable checkpoint'),
        'text': (b'model: my weights\n', 'not a readable checkpoint'),
        'plain_pickle': (pickle.dumps({'model': 1}), 'not a readable checkpoint'),
        'bare_state_dict': (ckpt['ema'], 'bare state_dict'),
        'a_list': ([1, 2, 3], 'holds a list'),
        'no_ema': (no_ema, 'missing ema, model'),
        'no_config': ({k: v for k, v in ckpt.items() if k != 'config'}, 'missing config'),
        'config_not_dict': (dict(ckpt, config=[1]), "broken 'config'"),
        'no_objective': (
            dict(ckpt, config={k: v for k, v in ckpt['config'].items() if k != 'objective'}),
            'objective',
        ),
        'unbuildable_args': (
            dict(ckpt, model_args=dict(ckpt['model_args'], n_wings=3)),
            'cannot build',
        ),
        'wrong_shape_weights': (other, 'do not fit'),
        'bad_objective': (
            dict(ckpt, config=dict(ckpt['config'], objective='teleport')),
            'diffusion settings',
        ),
    }


def test_broken_checkpoints_are_one_line(data, trained, tmp_path):
    for name, (content, words) in broken_checkpoints(trained, tmp_path).items():
        path = str(tmp_path / f'{name}.pt')
        if isinstance(content, bytes):
            open(path, 'wb').write(content)
        else:
            torch.save(content, path)
        before = open(path, 'rb').read()
        one_line_exit(lambda: sample.load_model(path, torch.device('cpu')), path, words)
        # reading never changes the file
        assert open(path, 'rb').read() == before
    one_line_exit(lambda: sample.load_model(str(tmp_path / 'nope.pt'), 'cpu'), 'does not exist')
    bad = tmp_path / 'broken.safetensors'
    bad.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}x')
    one_line_exit(lambda: sample.load_model(str(bad), 'cpu'), 'not a readable safetensors file')
    # through the real entrances: sample.py and a resume
    shutil.copy(tmp_path / 'truncated.pt', tmp_path / 'ckpt.pt')
    one_error_line(
        run(['sample.py', f'--out_dir={tmp_path}', '--device=cpu']), 'not a readable checkpoint'
    )
    shutil.copy(tmp_path / 'no_ema.pt', tmp_path / 'ckpt.pt')
    one_error_line(
        run(
            ['train.py', f'--out_dir={tmp_path}', '--init_from=resume', f'--data_dir={data}'] + TINY
        ),
        'missing model, ema',
    )


def test_resume_needs_the_training_state(trained, tmp_path):
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    path = str(tmp_path / 'ckpt.pt')
    torch.save({k: v for k, v in ckpt.items() if k != 'optimizer'}, path)
    one_line_exit(lambda: checkpoint.load(path, training=True), 'missing optimizer')
    # enough to sample from
    checkpoint.load(path)
    one_line_exit(
        lambda: checkpoint.load(os.path.join(trained, 'model.safetensors'), training=True), 'export'
    )


def test_safetensors_export_samples_like_the_checkpoint(trained, tmp_path):
    """The shareable file holds no pickle, and sampling it gives the same images as the checkpoint's
    EMA."""
    from safetensors import safe_open

    path = os.path.join(trained, 'model.safetensors')
    with safe_open(path, 'pt') as f:
        info = f.metadata()
    assert (
        json.loads(info['model_args'])['arch'] == 'dit'
        and json.loads(info['config'])['objective'] == 'flow'
    )
    assert json.loads(info['meta'])['dataset'] == 'shapes'
    images = []
    for name in ('ckpt.pt', 'model.safetensors'):
        model, diffusion, meta, _ = sample.load_model(
            os.path.join(trained, name), torch.device('cpu')
        )
        images.append(sample.sample_images(model, diffusion, torch.arange(6), meta, 3.0, steps=2))
    assert torch.equal(images[0], images[1])
    # on demand, from any checkpoint (here best.pt), with the CLI
    p = run(['checkpoint.py', os.path.join(trained, 'best.pt'), str(tmp_path / 'best.safetensors')])
    assert p.returncode == 0, p.stderr
    p = run(
        [
            'sample.py',
            f'--out_dir={trained}',
            '--ckpt_name=model.safetensors',
            '--device=cpu',
            '--steps=1',
            '--per_class=1',
        ]
    )
    assert p.returncode == 0 and (tmp_path / 'best.safetensors').exists(), p.stderr
    one_error_line(
        run(
            [
                'sample.py',
                f'--out_dir={trained}',
                '--ckpt_name=model.safetensors',
                '--use_ema=False',
            ]
        ),
        "no 'model' weights",
    )


# ---------------------------------------------------------------- settings

TRAIN_BAD = [
    ('grad_clip', -1.0),
    ('ema_decay', 1.5),
    ('class_dropout', 2.0),
    ('eval_interval', -1),
    ('max_iters', -5),
    ('batch_size', 0),
    ('gradient_accumulation_steps', 0),
    ('lr', -1.0),
    ('eval_batches', 0),
    ('log_interval', 0),
    ('beta2', 1.0),
    ('min_lr', 1.0),
    ('objective', 'ddpm'),
    ('arch', 'resnet'),
    ('init_from', 'best'),
    ('unet_mult', ()),
    ('warmup_iters', -1),
    ('patience', -2),
]
SAMPLE_BAD = [
    ('steps', -1),
    ('per_class', 0),
    ('batch_size', 0),
    ('order', 7),
    ('spacing', 'foo'),
    ('sampler', 'rk4'),
    ('threshold', 1.5),
    ('threshold_max', 0.5),
    ('grade_per_class', 0),
    ('eta', -1.0),
]
BENCH_BAD = [('batch_size', 0), ('iters', 0), ('warmup', -1), ('size', 'Q/2'), ('sample_batch', 0)]
PREPARE_BAD = [
    ('resolution', 0),
    ('num_train', 0),
    ('num_val', -1),
    ('val_fraction', 1.0),
    ('vae_batch', 0),
    ('text_max_len', 0),
]


@pytest.mark.parametrize(
    'module, key, value',
    [(train, k, v) for k, v in TRAIN_BAD]
    + [(sample, k, v) for k, v in SAMPLE_BAD]
    + [(bench, k, v) for k, v in BENCH_BAD],
)
def test_harmful_settings_are_refused(monkeypatch, module, key, value):
    monkeypatch.setattr(module, key, value)
    one_line_exit(module.check_config, f'--{key}=')


@pytest.mark.parametrize('key, value', PREPARE_BAD)
def test_harmful_prepare_settings_are_refused(key, value):
    cfg = {
        k: getattr(prepare, k)
        for k in ('dataset', 'out_dir', 'resolution', 'num_train', 'num_val', 'val_fraction')
    }
    one_line_exit(lambda: prepare.main(dict(cfg, **{key: value})), f'--{key}=')


def test_defaults_pass_the_checks():
    for module in (train, sample, bench):
        module.check_config()
    prepare.check_config({'dataset': 'shapes'})


@pytest.mark.parametrize('device', ['nosuch', 'cuda:7'])
def test_unknown_device(device):
    one_line_exit(lambda: setup_device(device), 'device')


def test_settings_through_the_scripts(data, tmp_path):
    """The real processes: a harmful value, a config file with a syntax error, a spacing a flow
    model lacks."""
    one_error_line(
        run(['train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', '--grad_clip=-1']),
        '--grad_clip=-1',
    )
    # refused before anything was written
    assert not os.listdir(tmp_path)
    cfg = tmp_path / 'broken.py'
    cfg.write_text("batch_size = 32\nlr = 3e-4 *\n")
    one_error_line(run(['train.py', str(cfg)]), str(cfg), 'line 2', 'SyntaxError')
    cfg.write_text("batch_size = 32\nlr = learning_rate\n")
    one_error_line(run(['sample.py', str(cfg)]), 'line 2', 'NameError')
    one_error_line(run(['sample.py', '--spacing=foo']), "--spacing='foo'")


# ---------------------------------------------------------------- datasets


def corrupt(data, tmp_path, name, how):
    d = str(tmp_path / name)
    shutil.copytree(data, d)
    how(d)
    return d


def rewrite_meta(d, **changes):
    meta = json.load(open(os.path.join(d, 'meta.json')))
    meta.update(changes)
    json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'))


def truncate(path, keep=0.5):
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw[: int(len(raw) * keep)])


CORRUPT = {
    'empty_meta': (
        lambda d: open(os.path.join(d, 'meta.json'), 'w').close(),
        'meta.json is unreadable',
    ),
    'corrupt_meta': (
        lambda d: open(os.path.join(d, 'meta.json'), 'w').write('{"kind": "pix'),
        'meta.json is unreadable',
    ),
    'meta_list': (
        lambda d: open(os.path.join(d, 'meta.json'), 'w').write('[1]'),
        'not a JSON object',
    ),
    'meta_no_splits': (lambda d: _drop_key(d, 'splits'), 'lacks'),
    'truncated_x': (
        lambda d: truncate(os.path.join(d, 'train_x.npy')),
        'train_x.npy is missing or truncated',
    ),
    'missing_y': (lambda d: os.remove(os.path.join(d, 'train_y.npy')), 'train_y.npy is missing'),
    'short_y': (
        lambda d: np.save(os.path.join(d, 'train_y.npy'), np.zeros(10, np.int64)),
        'train_y.npy has shape (10,)',
    ),
    'labels_too_big': (
        lambda d: np.save(os.path.join(d, 'train_y.npy'), np.full(64, 12, np.int64)),
        'labels outside 0..11',
    ),
    'negative_labels': (
        lambda d: np.save(os.path.join(d, 'train_y.npy'), np.full(64, -1, np.int64)),
        'labels outside',
    ),
    'wrong_resolution': (lambda d: rewrite_meta(d, resolution=16), 'meta.json says'),
}


def _drop_key(d, key):
    meta = json.load(open(os.path.join(d, 'meta.json')))
    del meta[key]
    json.dump(meta, open(os.path.join(d, 'meta.json'), 'w'))


def test_corrupt_datasets_are_one_line(data, tmp_path):
    for name, (how, words) in CORRUPT.items():
        d = corrupt(data, tmp_path, name, how)
        msg = one_line_exit(lambda: Data(d, 'train', torch.device('cpu')), words)
        assert 're-run prepare.py' in msg
    # through train.py: the check happens before anything is written
    out = tmp_path / 'out'
    one_error_line(
        run(['train.py', f'--data_dir={tmp_path / "short_y"}', f'--out_dir={out}'] + TINY),
        'train_y.npy',
    )
    assert not out.exists()


def test_text_arrays_are_checked(data, tmp_path):
    d = corrupt(data, tmp_path, 'text', lambda d: None)
    rewrite_meta(d, text_dim=4, text_max_len=3)
    for split, n in (('train', 64), ('val', 8)):
        np.save(os.path.join(d, f'{split}_text.npy'), np.zeros((n, 3, 4), np.float16))
        np.save(os.path.join(d, f'{split}_text_mask.npy'), np.ones((n, 3), bool))
        np.save(os.path.join(d, f'{split}_text_pooled.npy'), np.zeros((n, 4), np.float16))
    for name, shape in (
        ('empty_text', (3, 4)),
        ('empty_text_mask', (3,)),
        ('empty_text_pooled', (4,)),
    ):
        np.save(
            os.path.join(d, name + '.npy'), np.zeros(shape, bool if 'mask' in name else np.float16)
        )
    assert len(Data(d, 'train', torch.device('cpu'), text=True)) == 64
    np.save(os.path.join(d, 'train_text_pooled.npy'), np.zeros((63, 4), np.float16))
    one_line_exit(
        lambda: Data(d, 'train', torch.device('cpu'), text=True),
        'train_text_pooled.npy has shape (63, 4)',
    )


# ---------------------------------------------------------------- one out_dir, two runs


def test_second_run_on_an_out_dir_is_refused(data, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    # this test process is "the first run"
    checkpoint.lock_out_dir(str(out))
    try:
        p = run(['train.py', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=1'] + TINY)
        one_error_line(p, 'in use by another training run', f'pid {os.getpid()}')
        assert sorted(os.listdir(out)) == ['train.lock']
    finally:
        # the first run ends
        checkpoint._lock_file.close()
        checkpoint._lock_file = None
    # a lock file left by a killed run, and its temporaries, do not block the next run
    (out / 'ckpt.pt.99999.tmp').write_bytes(b'partial')
    p = run(['train.py', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=1'] + TINY)
    assert p.returncode == 0, p.stderr
    assert not list(out.glob('*.tmp')) and (out / 'ckpt.pt').exists()


def run_with(patch, args):
    """train.py as a process, with `patch` (Python source) applied first: to inject faults
    deterministically."""
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = {['train.py'] + args!r}
        {textwrap.indent(textwrap.dedent(patch), '        ').strip()}
        runpy.run_path('train.py', run_name='__main__')
    """)
    return run(['-c', code])


def test_disk_full_keeps_the_previous_checkpoint(data, tmp_path):
    out = tmp_path / 'out'
    args = [f'--data_dir={data}', f'--out_dir={out}', '--eval_interval=1'] + TINY
    assert run(['train.py', '--max_iters=1'] + args).returncode == 0
    before = snapshot(out)
    # the resumed run's first checkpoint write fills the disk half-way through
    patch = """
        import errno, torch
        def save(obj, f):
            f.write(b'half a checkpoint')
            raise OSError(errno.ENOSPC, 'No space left on device')
        torch.save = save
    """
    one_error_line(
        run_with(patch, ['--max_iters=2', '--init_from=resume'] + args), 'disk full', 'intact'
    )
    after = snapshot(out)
    # holds the pid of the run that holds it
    del before['train.lock'], after['train.lock']
    # every file byte-identical, the partial temporary file removed
    assert after == before


def test_prepare_disk_full_keeps_the_previous_dataset(data, tmp_path, monkeypatch):
    out = tmp_path / 'shapes'
    shutil.copytree(data, out)
    before = snapshot(out)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'posix_fallocate', full)
    cfg = {
        k: getattr(prepare, k)
        for k in ('dataset', 'resolution', 'num_train', 'num_val', 'val_fraction', 'seed')
    }
    one_line_exit(
        lambda: prepare.main(dict(cfg, out_dir=str(out), num_train=64)), 'disk full', 'GB'
    )
    assert snapshot(out) == before
    assert not os.path.exists(str(out) + '.tmp')


def test_symlinked_class_folders_are_followed_and_loops_listed(tmp_path):
    from PIL import Image

    src, elsewhere = tmp_path / 'src', tmp_path / 'elsewhere' / 'dogs'
    (src / 'cats').mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    for i in range(3):
        Image.new('RGB', (8, 8), (200, 10, 10)).save(src / 'cats' / f'{i}.png')
        Image.new('RGB', (8, 8), (10, 10, 200)).save(elsewhere / f'{i}.png')
    os.symlink(elsewhere, src / 'dogs')
    # a link back up the tree
    os.symlink(src, src / 'cats' / 'loop')
    files, classes, skipped = prepare.scan_folder(str(src))
    assert classes == ['cats', 'dogs'] and len(files) == 6
    assert [f for f, _ in skipped] == [
        os.path.join('cats', 'loop')
    ] and 'already scanned' in skipped[0][1]
