"""
MFU accounting: the FLOPs of a model (counted, not measured) and the peak FLOP/s of a GPU (from its
name). train.py logs MFU with them; bench.py prints it beside img/s.
"""

import torch


def flops_per_image(model, shape, text_len=77):
    """Forward FLOPs for one image, counted from the shapes of every matmul/conv/attention call
    (torch.utils.flop_counter): analytic, not measured. The forward runs on meta tensors standing in
    for the weights and inputs, so the count is the same on any device (on a CPU, SDPA's kernel is
    invisible to the counter) and nothing is computed. A text model is counted with text_len caption
    tokens."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    # any model with our forward(x, t, y, text), e.g. bench.py's peer
    config = getattr(model, 'config', None)
    D = getattr(config, 'text_dim', 0) or 0
    meta = lambda *s, dtype=torch.float32: torch.zeros(s, dtype=dtype, device='meta')
    weights = {
        k: torch.empty_like(v, device='meta')
        for k, v in [*model.named_parameters(), *model.named_buffers()]
    }
    text = (meta(1, text_len, D), meta(1, text_len, dtype=torch.bool), meta(1, D)) if D else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        functional_call(model, weights, (meta(1, *shape), meta(1), meta(1, dtype=torch.long), text))
    return counter.get_total_flops()


def guess_peak_flops(dev):
    """Dense bf16 tensor-core peak FLOP/s (vendor spec sheets, no sparsity) of the GPU torch names,
    for MFU; 0 if unknown. The first key in the name wins, so a variant comes before its family: an
    H100 is SXM (989) unless its name says PCIe (756) or NVL (835); 'NVIDIA H100 80GB HBM3' is the
    SXM part."""
    if dev.type != 'cuda':
        return 0.0
    name = torch.cuda.get_device_name(dev).upper()
    # Hopper
    for key, flops in (
        ('H100 PCIE', 756e12),
        ('H100 NVL', 835e12),
        ('H100', 989e12),
        ('H800 PCIE', 756e12),
        ('H800', 989e12),
        ('H200 NVL', 835e12),
        ('GH200', 989e12),
        ('H200', 989e12),
        # Blackwell, Ampere
        ('GB200', 2500e12),
        ('B200', 2250e12),
        ('A100', 312e12),
        ('A800', 312e12),
        ('L40S', 362e12),
        ('L40', 181e12),
        ('L4', 121e12),
        ('A10G', 70e12),
        ('A10', 125e12),
        # V100, T4: fp16
        ('4090', 165e12),
        ('3090', 71e12),
        ('V100', 125e12),
        ('T4', 65e12),
    ):
        if key in name:
            return flops
    return 0.0
