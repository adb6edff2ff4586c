"""
The optimiser side of train.py's step: AdamW (or Adafactor) with weight decay on the weight
matrices only, and the guarded update (clip the gradient; skip, on the device, an update whose
gradient is not finite; count the skips and stop a run that keeps making them). Both read the run's
settings from cfg, train.py's config dict.
"""

import torch


def make_optimizer(model, cfg):
    """AdamW or Adafactor on the trainable parameters; weight decay only on matrices (not biases,
    norms, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and 'embed' not in name else no_decay).append(p)
    groups = [
        {'params': decay, 'weight_decay': cfg['weight_decay']},
        {'params': no_decay, 'weight_decay': 0.0},
    ]
    lr, betas = cfg['lr'], (cfg['beta1'], cfg['beta2'])
    if cfg['optim'] == 'adamw':
        # fused: one kernel for all parameters, and it can skip a step on the device (found_inf,
        # see Guard)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    from transformers.optimization import Adafactor

    # our LR schedule drives it, so its own relative-step schedule is off
    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


class Guard:
    """The optimiser step, guarded: clip the gradient, and skip an update whose gradient is not
    finite (a corrupt example, an overflow), which would poison the weights and Adam's moments for
    good. The skip is made on the device (fused AdamW's found_inf, GradScaler's own mechanism,
    which fp16 uses) and counted there, read only at log time, so no step waits for the host
    (Adafactor: one host sync a step)."""

    def __init__(self, dev, fp16, cfg):
        self.cfg = cfg
        zero = torch.zeros((), dtype=torch.long, device=dev)
        # fp16: GradScaler's overflow skips are its normal life, not a fault
        self.fp16 = fp16
        # non-finite gradients in the current row, the longest row, and the count since the log
        self.row = zero
        self.longest = zero.clone()
        self.new = zero.clone()
        # the summed loss and the number of steps it sums, since the log
        self.loss_sum = torch.zeros((), device=dev)
        self.n_loss = zero.clone()

    def step(self, model, optimizer, scaler, loss):
        """Clip, then update unless the gradient is not finite. -> whether the optimiser stepped
        (AdamW: always; it skips a non-finite update itself, on the device)."""
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), self.cfg['grad_clip'] or float('inf')
        )
        ok = torch.isfinite(grad_norm) | self.fp16
        # (fp16: GradScaler sets it itself)
        optimizer.found_inf = (~ok).float()
        stepped = self.cfg['optim'] == 'adamw' or bool(ok.item())
        if stepped:
            scaler.step(optimizer)
            scaler.update()
        self.row = (self.row + 1) * ~ok
        self.longest = torch.maximum(self.longest, self.row)
        self.new = self.new + ~ok
        self.loss_sum = self.loss_sum + torch.where(ok, loss, 0.0)
        self.n_loss = self.n_loss + ok
        optimizer.zero_grad(set_to_none=True)
        return stepped

    def check(self, run, master):
        """At log time, on every process (all read the same all-reduced gradients): count the
        skipped updates, and stop the run after max_bad_steps in a row."""
        skipped, longest = self.new.item(), self.longest.item()
        run.bad_steps += skipped
        if skipped and master:
            print(
                f"step {run.step} | {skipped} non-finite gradient(s) since the last log: "
                f"update(s) skipped ({run.bad_steps} skipped so far)",
                flush=True,
            )
        if longest >= self.cfg['max_bad_steps']:
            raise SystemExit(
                f"error: {longest} non-finite gradients in a row by step {run.step}: lower lr, "
                "check the data, or resume from the last checkpoint "
                f"({self.cfg['out_dir']}/ckpt.pt)"
            )
        self.longest.zero_()
        self.new.zero_()

    def mean_loss(self):
        """The mean loss of the updates made since the last call."""
        mean = self.loss_sum.item() / max(self.n_loss.item(), 1)
        self.loss_sum = self.loss_sum * 0
        self.n_loss = self.n_loss * 0
        return mean
