"""`train.py --out_dir=X --init_from=resume` with nothing else: the run's own settings come from its
checkpoint, so a run started from a config file and overrides, killed, and resumed from its out_dir
alone ends bit-identical to one never interrupted; a setting given again with another value is
named, and refused where it would change what the run computes (unless --force); the W&B run id is
kept."""

import os
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import one_error_line
from test_train import KILL_MID_WRITE, TINY, assert_same_run, data, run, run_with, weights

# pytest finds the shared dataset fixture by its name here
assert data
# stands in for the wandb package: each init's id and resume mode, one JSON line in WANDB_LOG
FAKE_WANDB = """
import json, os, sys, types
class Run:
    def __init__(self, id):
        self.id = id
    def log(self, metrics, step):
        pass
def init(project, id=None, config=None, resume=None):
    with open('WANDB_LOG', 'a') as f:
        f.write(json.dumps(dict(project=project, id=id, resume=resume)) + '\\n')
    return Run(id or 'run-abc123')
sys.modules['wandb'] = types.SimpleNamespace(init=init)
"""


def resume(out, *extra, check=True):
    return run(['train.py', f'--out_dir={out}', '--init_from=resume', *extra], check=check)


def test_resumed_from_the_out_dir_alone_equals_uninterrupted(data, tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    # settings away from train.py's defaults, from a config file and from overrides
    config = tmp_path / 'config.py'
    config.write_text("lr = 2e-3\nseed = 7\nmin_snr_gamma = 5.0\n")
    args = TINY + [str(config), f'--data_dir={data}', '--max_iters=6', '--eval_interval=2']
    run(['train.py', f'--out_dir={a}', *args, '--batch_size=6'])
    # killed half-way through writing its 2nd checkpoint (step 4): ckpt.pt is step 2's
    p = run_with(
        KILL_MID_WRITE.format(n=2, name='ckpt.pt'), [f'--out_dir={b}', *args, '--batch_size=6']
    )
    assert p.returncode == -signal.SIGKILL
    assert torch.load(b / 'ckpt.pt', weights_only=True)['step'] == 2
    p = resume(b)
    assert 'resuming from' in p.stdout and 'at step 2' in p.stdout and 'changed' not in p.stdout
    assert_same_run(weights(a), weights(b))


def test_a_changed_setting_is_named_and_refused_unless_forced(data, tmp_path):
    out = tmp_path / 'run'
    run(['train.py', f'--out_dir={out}', f'--data_dir={data}', *TINY, '--max_iters=4'])
    before = weights(out)
    # the run computes with batch_size 8 (TINY): another is refused, nothing is written
    p = resume(out, '--batch_size=4', check=False)
    one_error_line(p, 'batch_size 8 -> 4', '--force=True', 'bit for bit')
    assert_same_run(weights(out), before)
    # given again with the same value: nothing to say; how it reports: named, allowed
    p = resume(out, '--batch_size=8', '--log_interval=2', '--max_iters=6')
    assert 'changed settings: max_iters 4 -> 6, log_interval 1 -> 2' in p.stdout, p.stdout
    # lr_decay_iters 40 (TINY): the schedule does not move
    line = next(x for x in p.stdout.splitlines() if x.startswith('max_iters changed'))
    lr_then, lr_now = line.split(' goes ')[1].split(' -> ')
    assert lr_then == lr_now and weights(out)['step'] == 6
    p = resume(out, '--lr=5e-4', '--max_iters=7', '--force=True')
    assert 'lr 0.001 -> 0.0005' in p.stdout and 'not the same run bit for bit' in p.stdout
    assert weights(out)['step'] == 7


def test_extending_max_iters_says_what_it_does_to_the_lr(data, tmp_path):
    out = tmp_path / 'run'
    args = TINY + ['--lr_decay_iters=0', '--warmup_iters=1', '--min_lr=1e-4']
    run(['train.py', f'--out_dir={out}', f'--data_dir={data}', *args, '--max_iters=4'])
    p = resume(out, '--max_iters=8')
    # the cosine decay that had reached min_lr at step 4 now ends at 8: the LR rises
    line = next(x for x in p.stdout.splitlines() if x.startswith('max_iters changed'))
    assert 'at step 4 goes 1.00e-04 -> ' in line and '--lr_decay_iters=4 keeps' in line, line
    assert float(line.split(' -> ')[1].split()[0]) > 1e-4


def test_the_wandb_run_id_is_kept(data, tmp_path):
    out, log = tmp_path / 'run', tmp_path / 'wandb.jsonl'
    fake = FAKE_WANDB.replace('WANDB_LOG', str(log))
    common = [f'--out_dir={out}', f'--data_dir={data}', *TINY, '--wandb_project=p']
    assert run_with(fake, common + ['--max_iters=2']).returncode == 0
    p = run_with(fake, [f'--out_dir={out}', '--init_from=resume', '--max_iters=4'])
    assert p.returncode == 0, p.stderr
    lines = log.read_text().splitlines()
    assert lines == [
        '{"project": "p", "id": null, "resume": "allow"}',
        '{"project": "p", "id": "run-abc123", "resume": "allow"}',
    ]
