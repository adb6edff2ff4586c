"""bench.py on a CPU: the model --size builds and its FLOP count, the MFU peaks, diffusers' DiT
beside ours, graph breaks under torch.compile(fullgraph=True), and the parts of the GPU suite that
need no GPU."""

import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import one_line_exit, require

import bench
import bench_suite
from data import Data, read_meta
from model import build_model
from flops import flops_per_image, guess_peak_flops

pytestmark = pytest.mark.usefixtures('one_thread')


def bench_model(monkeypatch, **settings):
    """The model bench.py would time with these settings, built on the meta device (no memory, no
    init cost)."""
    for k, v in settings.items():
        monkeypatch.setattr(bench, k, v)
    shape, ncls, L, D = bench.data_spec()
    with torch.device('meta'):
        model = build_model(bench.model_args(shape, ncls, D))
    return model, shape, L


def test_size_b2_is_the_papers_dit_b2(monkeypatch):
    # 256 px = 32x32x4 SD-VAE latents, 1000 classes. The paper's 23.01 "Gflops" for DiT-B/2 (Table
    # 4) are fvcore
    # counts, one per multiply-add; torch's FlopCounterMode counts two, so GMACs = FLOPs / 2. The
    # paper's DiT also
    # predicts a learned variance (8 output channels, ours 4): 3 MMACs, 0.01%. Ours: 23.002 GMACs,
    # 130.3M params.
    model, shape, L = bench_model(
        monkeypatch, size='B/2', resolution=32, channels=4, num_classes=1000
    )
    assert shape == (4, 32, 32) and L == 0
    assert (
        model.config.n_layer,
        model.config.n_head,
        model.config.n_embd,
        model.config.patch_size,
    ) == (12, 12, 768, 2)
    assert model.config.text_dim == 0 and not any(
        'cross' in name for name, _ in model.named_modules()
    )
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(130, rel=0.01)
    assert flops_per_image(model, shape, L) / 2e9 == pytest.approx(23.01, rel=0.002)


def test_size_leaves_the_caption_settings_alone(monkeypatch):
    # --text_len asks for captions: the size sets depth, heads and width, never the caption tokens
    # or their width
    model, shape, L = bench_model(monkeypatch, size='S/2', resolution=16, text_len=20, text_dim=64)
    assert (
        L == 20
        and model.config.text_dim == 64
        and model.config.n_embd == 384
        and model.config.num_classes == 0
    )


GPUS = [
    ('NVIDIA H100 80GB HBM3', 989),
    ('NVIDIA H100 PCIe', 756),
    ('NVIDIA H100 NVL', 835),
    ('NVIDIA H200', 989),
    # dense bf16 TFLOP/s; an H100 80GB HBM3 is SXM
    ('NVIDIA A100-SXM4-80GB', 312),
    ('NVIDIA GeForce GTX 1080', 0),
]


@pytest.mark.parametrize('name, tflops', GPUS)
def test_peak_flops_by_gpu_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda dev=None: name)
    assert guess_peak_flops(torch.device('cuda')) == tflops * 1e12
    assert guess_peak_flops(torch.device('cpu')) == 0


def test_peer_is_diffusers_dit_of_the_same_size(monkeypatch):
    require('diffusers')
    torch.manual_seed(0)
    model, shape, L = bench_model(
        monkeypatch, resolution=8, num_classes=10, n_layer=2, n_head=2, n_embd=64
    )
    args = bench.model_args(shape, 10, 0)
    peer = bench.peer_model(args)
    # the same FLOPs but for diffusers' per-block timestep and label embeddings (per image, not per
    # token)
    assert flops_per_image(peer, shape, 0) == pytest.approx(
        flops_per_image(model, shape, L), rel=0.05
    )
    x, t, y = torch.randn(3, *shape), torch.rand(3) * 1000, torch.tensor([0, 4, 9])
    assert peer(x, t, y).shape == x.shape
    for other in (dict(args, arch='unet'), dict(args, text_dim=32), dict(args, share=2)):
        assert 'none for this model' in bench.peer_model(other)


TINY_DIT = dict(
    arch='dit',
    input_size=8,
    in_channels=4,
    num_classes=10,
    n_head=2,
    patch_size=2,
    n_layer=2,
    n_embd=32,
)
TINY_UNET = dict(
    arch='unet',
    input_size=8,
    in_channels=3,
    num_classes=10,
    n_head=2,
    channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
)
# (model, gradient checkpointing): the DiT also with captions
COMPILED = [
    (TINY_DIT, False),
    (TINY_DIT, True),
    (dict(TINY_DIT, text_dim=16), False),
    (TINY_UNET, False),
    (TINY_UNET, True),
]


@pytest.mark.parametrize('args, checkpointing', COMPILED)
def test_forward_backward_compile_without_graph_breaks(args, checkpointing):
    # fullgraph=True: any graph break in the model is an error here, on a CPU, not on a rented GPU.
    # Dynamo finds breaks whatever the backend; aot_eager also traces the backward (~3 s a model).
    # Inductor's C++ build is ~75 s a model cold on a 2-core CPU: NANODIFFUSION_SLOW=1 runs it too.
    from diffusion import Diffusion

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(args)
    model.grad_checkpoint = checkpointing
    diffusion = Diffusion('flow', 'cosine', 'v', 1000)
    x, y, t = (
        torch.randn(2, args['in_channels'], 8, 8),
        torch.tensor([1, 2]),
        torch.tensor([0.3, 0.8]),
    )
    text = None
    # captions of 3 and 5 real tokens
    if args.get('text_dim'):
        text = (
            torch.randn(2, 5, 16),
            torch.arange(5) < torch.tensor([[3], [5]]),
            torch.randn(2, 16),
        )
    want = diffusion.loss(model, x, y, t, torch.ones_like(x), text=text)
    for backend in ['aot_eager'] + (
        ['inductor'] if os.environ.get('NANODIFFUSION_SLOW') == '1' else []
    ):
        net = torch.compile(model, fullgraph=True, backend=backend)
        loss = diffusion.loss(net, x, y, t, torch.ones_like(x), text=text)
        loss.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad()


def test_suite_latents_are_a_dataset_train_py_trains_on(tmp_path, monkeypatch):
    folder = str(tmp_path / 'latents')
    bench_suite.write_latents(folder, n=16, shape=(4, 8, 8), classes=3)
    meta = read_meta(folder)
    assert meta['splits'] == {'train': 16, 'val': 0}
    x, y = Data(folder, 'train', torch.device('cpu')).get(np.arange(4))
    assert x.shape == (4, 4, 8, 8) and x.dtype == torch.float32 and 0 <= y.min() and y.max() < 3
    # train.py on it (no val split: it validates on train), read as the suite reads it: 3 log lines,
    # then stopped
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    rows = bench_suite.measure(
        f'train.py --data_dir={folder} --out_dir={tmp_path}/out --patch_size=4 --n_layer=1 '
        '--n_head=2 '
        '--n_embd=32 --batch_size=4 --log_interval=1 --eval_interval=0 --device=cpu',
        lines=3,
    )
    assert float(rows['train img/s']) > 0 and rows['MFU'] == 'n/a', rows


def test_suite_reads_bench_tables_and_errors(monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    rows = bench_suite.measure(
        'bench.py --resolution=8 --n_layer=1 --n_head=2 --n_embd=32 --num_classes=4 --batch_size=4 '
        '--warmup=1 --iters=1 --sample_steps=0 --device=cpu'
    )
    assert float(rows['train img/s']) > 0 and rows['peak memory'] == 'n/a (CPU)', rows
    # the side-by-side row, when diffusers is here
    if 'installed' not in rows['diffusers DiT']:
        assert rows['ours / diffusers'].endswith('x train img/s'), rows
    assert bench_suite.measure('bench.py --batch_size=0') == {
        'error': 'error: --batch_size=0 must be > 0'
    }


def test_suite_rewrites_only_its_section(tmp_path):
    path = str(tmp_path / 'BENCHMARKS.md')
    with open(path, 'w') as f:
        f.write(
            f"# Benchmarks\n\nabove\n\n{bench_suite.BEGIN}\nold table\n{bench_suite.END}\n\nbelow\n"
        )
    results = [
        (
            'DiT-B/2',
            'bench.py --size=B/2',
            {'train img/s': '812.0', 'MFU': '41.0% of 989 TFLOP/s', 'x': 'y'},
        ),
        (
            'DiT-XL/2',
            'bench.py --size=XL/2',
            {'error': 'error: CUDA out of memory at batch_size=256'},
        ),
    ]
    # rewritten in place, not appended
    for _ in range(2):
        bench_suite.publish(path, 'Measured on a test.', results)
    text = open(path).read()
    assert text.startswith('# Benchmarks\n\nabove\n\n') and text.endswith(
        f'{bench_suite.END}\n\nbelow\n'
    )
    assert (
        text.count(bench_suite.BEGIN) == 1
        and 'old table' not in text
        and 'Measured on a test.' in text
    )
    assert '| DiT-B/2 | 812.0 | 41.0% | — | — | — | — | — | `python bench.py --size=B/2` |' in text
    assert '| DiT-XL/2 | error: CUDA out of memory at batch_size=256 |' in text
    new = str(tmp_path / 'new.md')
    # no file yet: the section is all of it
    bench_suite.publish(new, 'h', results[:1])
    assert open(new).read().startswith(bench_suite.BEGIN + '\nh\n\n| run |')


def test_suite_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(bench, 'suite', True)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    one_line_exit(bench.check_config, '--suite=True', 'no CUDA GPU', 'BENCHMARKS.md is unchanged')


def test_bench_times_train_py_step(monkeypatch):
    """bench.py has no training step of its own: it times train.train_step, with train.py's
    optimiser (AdamW with its weight-decay groups) and guarded update (a non-finite gradient's
    update is skipped)."""
    import train
    from diffusion import Diffusion

    calls = []
    real = train.train_step

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(train, 'train_step', counted)
    for k, v in dict(batch_size=4, warmup=2, n_layer=1, n_head=2, n_embd=32, patch_size=4).items():
        monkeypatch.setattr(bench, k, v)
    monkeypatch.setattr(bench, 'resolution', 8)
    shape, ncls, L, D = bench.data_spec()
    model = build_model(bench.model_args(shape, ncls, D))
    dev = torch.device('cpu')
    data = bench.bench_data(dev, shape, ncls, L, D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net, step, mem = bench.ready(model, Diffusion(), data, shape, dev, torch.float32, nullcontext())
    # the warm-up steps went through train.py's step, on AdamW's two groups (decay, no decay)
    assert len(calls) == 2 and mem is None
    optimizer = calls[0][7]
    assert [g['weight_decay'] for g in optimizer.param_groups] == [train.weight_decay, 0.0]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a NaN in the weights makes the gradient non-finite: the guard skips that update
    first = next(model.parameters())
    with torch.no_grad():
        first.view(-1)[0] = float('nan')
    after = [p.detach().clone() for p in model.parameters()]
    step(5)
    for a, p in zip(after, model.parameters()):
        assert torch.equal(a.nan_to_num(), p.detach().nan_to_num())
