"""sample.py --grade on a control model: the first val hints, each with its image's class, sampled
with the branch and as the base model; how closely the samples follow the hints (mask IoU, edge F1:
images.control_scores) beside their class accuracy. A tiny random control model, CPU, seconds."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import one_error_line, python
from data import read_meta
from hints import canny
from images import control_scores
from model import build_model

pytestmark = pytest.mark.usefixtures('one_thread')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', TQDM_DISABLE='1')
# a stand-in for the model: grey images, red exactly where each image's hint is (a perfect mask)
PERFECT = """
import images, torch
def sample_images(model, diffusion, labels, meta, cfg_scale, hint=None, **kw):
    # the grid's samples have no hint: all grey
    on = torch.zeros(len(labels), 16, 16, dtype=torch.long)
    if hint is not None:
        on = (hint.cpu()[:, 0] > 0.5).long()
    red, grey = torch.tensor([255, 0, 0]), torch.tensor([128, 128, 128])
    return (on[:, None] * red.view(1, 3, 1, 1) + (1 - on[:, None]) * grey.view(1, 3, 1, 1)).byte()
images.sample_images = sample_images
"""


def run(args, patch=''):
    """sample.main() in a fresh process with sys.argv = args, `patch` (Python source) applied
    first."""
    code = (
        f"import sys\nsys.argv = {['sample.py'] + args!r}\n{patch}\nimport sample\nsample.main()\n"
    )
    return python(['-c', code], ROOT, ENV)


def shape_masks(n=4, size=16):
    """Squares of different places and sizes, bool [n, 1, size, size]."""
    m = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):
        m[i, 0, 2 + i : 8 + 2 * i, 3 : 9 + i] = True
    return m


def test_perfect_and_empty_samples_score_one_and_zero():
    masks = shape_masks()
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    perfect = torch.where(masks, red, torch.full_like(red, 128))
    blank = torch.full_like(perfect, 128)
    name, iou = control_scores(perfect, masks.float(), {'hint': 'mask'})
    assert name == 'mask IoU' and iou.tolist() == [1.0] * 4
    assert control_scores(blank, masks.float(), {'hint': 'mask'})[1].tolist() == [0.0] * 4
    # a sample whose own edges are the hint
    meta = {'hint': 'canny', 'canny': [1.0, 0.1, 0.2]}
    edges = canny(perfect, *meta['canny']).float() / 255
    name, f1 = control_scores(perfect, edges, meta)
    assert name == 'edge F1' and edges.sum() > 0 and f1.tolist() == pytest.approx([1.0] * 4)
    assert control_scores(blank, edges, meta)[1].tolist() == [0.0] * 4


@pytest.fixture(scope='module')
def control_model(tmp_path_factory):
    """A shapes-mask dataset and a random control DiT's checkpoint on it (out/ckpt.pt)."""
    tmp = tmp_path_factory.mktemp('grade')
    data, out = tmp / 'shapes-mask', tmp / 'out'
    prep = ['prepare.py', '--hint=mask', '--num_train=24', '--num_val=12', '--resolution=16']
    p = python(prep + [f'--out_dir={data}'], ROOT, ENV)
    assert p.returncode == 0, p.stderr
    meta = read_meta(str(data))
    args = dict(
        arch='dit',
        input_size=16,
        in_channels=3,
        patch_size=4,
        n_layer=2,
        n_head=2,
        n_embd=32,
        num_classes=meta['num_classes'],
        hint_channels=1,
        hint_size=16,
    )
    torch.manual_seed(0)
    model = build_model(args)
    # off the zero init: the branch changes the output
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = model.state_dict()
    config = dict(
        objective='flow', schedule='cosine', prediction='v', num_timesteps=1000, data_dir=str(data)
    )
    os.makedirs(out)
    ckpt = dict(model=weights, ema=weights, model_args=args, config=config, meta=meta)
    torch.save(ckpt, out / 'ckpt.pt')
    return out


def grade_lines(p):
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith('mask IoU and class accuracy'))
    return lines[head], lines[head + 1 : head + 3]


def test_grade_prints_iou_and_accuracy_with_the_branch_and_without(control_model):
    args = [f'--out_dir={control_model}', '--grade=True', '--grade_hints=6', '--steps=2']
    head, rows = grade_lines(run(args + ['--per_class=1', '--device=cpu']))
    assert 'first 6 val hints' in head
    assert rows[0].startswith('control_scale 1: mask IoU ')
    assert rows[1].startswith('control_scale 0 (the base model): mask IoU ')
    for row in rows:
        iou = float(row.split('mask IoU ')[1].split(',')[0])
        acc = float(row.split('class accuracy ')[1].rstrip('%'))
        assert 0 <= iou <= 1 and 0 <= acc <= 100


def test_grade_of_a_perfect_stand_in_is_one(control_model):
    """Each image is drawn from the hint it was given: the hints reach the samples they belong
    to, in order, and an exact shape scores IoU 1 whatever the control scale."""
    args = [f'--out_dir={control_model}', '--grade=True', '--grade_hints=12', '--per_class=1']
    _, rows = grade_lines(run(args + ['--steps=1', '--device=cpu'], PERFECT))
    assert all('mask IoU 1.000,' in row for row in rows), rows


def test_a_control_grade_on_a_model_without_hints_data_is_one_line(control_model, tmp_path):
    """A dataset without hints (plain shapes) cannot grade a control model."""
    plain = tmp_path / 'shapes'
    prep = ['prepare.py', '--num_train=24', '--num_val=12', '--resolution=16']
    subprocess.run([sys.executable] + prep + [f'--out_dir={plain}'], cwd=ROOT, env=ENV, check=True)
    args = [f'--out_dir={control_model}', f'--data_dir={plain}', '--grade=True', '--steps=1']
    one_error_line(run(args + ['--per_class=1', '--device=cpu']), 'no hints')
