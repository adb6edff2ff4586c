"""
Distillation: students that sample in 1-4 steps, one network call each. train.py trains them in its
own loop (AMP, EMA, accumulation, compile, atomic checkpoints, exact resume, DDP) when distill_steps
is set, with `Distill` as its objective in place of the plain one; this file has what is
particular to them: the rounds, the teacher, the loss, and the record a student's checkpoint keeps
for sample.py. The teacher out-shapes/ckpt.pt -> out-distill, then its 1-step student (1 call):

    python train.py config/distill_shapes.py
    python sample.py --out_dir=out-distill --ckpt_name=student1.pt --grade=True

- Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion
  Models", 2022, algorithm 2): the student, initialised as the teacher, learns to take in one DDIM
  step what the teacher takes in two; then it is the teacher of the next round, at half the steps
  (e.g. 8 -> 4 -> 2 -> 1). The first round's teacher, the trained model, may take more
  (distill_teacher_steps, e.g. 8 -> 2 -> 1 with 4 per student step).
- Guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", 2023): the
  student takes the CFG scale w as an input (layers.guidance_embedding) and learns the guided output
  uncond + w (cond - uncond), so it needs one call per step, not two. Here it is learnt with the
  first round of steps (the teacher's CFG output, two calls, is the target); a leading round of 0
  steps learns it alone, at any t (Meng et al.'s stage one).
"""

import copy
import functools
import itertools
import math
import sys

import torch

from samplers import guided


def check_rounds(steps, cfg, init_from, max_iters, teacher_steps=0, iters=()):
    """train.py's distill_steps, distill_cfg, distill_teacher_steps and distill_iters, checked: one
    line before anything runs."""
    ok = all(isinstance(n, int) and n >= 0 for n in steps) and 0 not in steps[1:]
    if steps and not (ok and all(2 * b == a for a, b in zip(steps, steps[1:]) if a)):
        sys.exit(
            f"error: --distill_steps={steps} must be student steps that halve each round, e.g. "
            "(4, 2, 1) or (0, 4, 2, 1)"
        )
    if steps and (init_from == 'scratch' or not iters and max_iters % len(steps)):
        sys.exit(
            f"error: --distill_steps={steps} needs a teacher (--init_from=its ckpt.pt, or resume) "
            "and a "
            f"--max_iters={max_iters} that its {len(steps)} round(s) divide (or --distill_iters)"
        )
    if iters and not (
        len(iters) == len(steps)
        and all(isinstance(n, int) and n > 0 for n in iters)
        and sum(iters) == max_iters
    ):
        sys.exit(
            f"error: --distill_iters={iters} must be each of the {len(steps)} round(s)' training "
            "steps (> 0), "
            f"summing to --max_iters={max_iters}"
        )
    first = next((n for n in steps if n), 0)
    if teacher_steps and not (first and teacher_steps % first == 0 and teacher_steps >= 2 * first):
        sys.exit(
            f"error: --distill_teacher_steps={teacher_steps} must be a multiple of the first "
            "round's student steps "
            f"({first}), at least twice it, e.g. {4 * (first or 1)}"
        )
    if len(cfg) != 2 or not 0 <= cfg[0] <= cfg[1]:
        sys.exit(
            f"error: --distill_cfg={cfg} must be the lowest and highest CFG scale the student "
            "learns, e.g. (1.0, 6.0)"
        )


def round_ends(rounds, max_iters, iters=()):
    """The step at which each round ends: iters' running sum, or max_iters split evenly."""
    return list(itertools.accumulate(iters or [max_iters // len(rounds)] * len(rounds)))


def student_args(ckpt, path, conditional, first_steps, teacher_steps=0):
    """The student's model_args: its teacher's network, taking the CFG scale as an input if it is
    conditional. A teacher that cannot be distilled here is one line."""
    args, c = ckpt['model_args'], ckpt['config']
    # the teacher is itself a student
    taught = c.get('student', {}).get('steps') or 0
    for bad, why in (
        (args.get('hint_channels'), "has a control branch: distil its base model"),
        (
            c['objective'] == 'vp' and c['prediction'] == 'eps',
            "predicts eps, which says nothing of x0 at pure noise (Salimans & Ho, sec. 4): train "
            "it with 'v'",
        ),
        (
            taught and taught != 2 * first_steps,
            f"is a {taught}-step student: distil it to {taught // 2}",
        ),
        (
            taught and teacher_steps,
            f"is a {taught}-step student, which samples only its own grid: "
            "set --distill_teacher_steps=0",
        ),
    ):
        if bad:
            raise SystemExit(f"error: cannot distil {path}: it {why}")
    return dict(args, guidance=bool(args.get('guidance') or conditional))


def solver(record):
    """sample_loop's sampler and grid for a step student (its record, at its steps): DDIM on the
    grid it learnt."""
    return dict(sampler='ddim', spacing=record['t'])


def teacher_substeps(rounds, teacher_steps):
    """The teacher's calls per student step, each round: 1 in a guidance round; teacher_steps //
    steps DDIM steps in the first round of steps (its teacher is the trained model, student_args
    checks: it can take any grid, and a finer one is a closer target to its ODE: the demo's
    teacher's 8 DDIM steps grade 97.6%, README); else 2 (Salimans & Ho)."""
    first = next((i for i, n in enumerate(rounds) if n), None) if teacher_steps else None
    return [teacher_steps // n if r == first else 1 + bool(n) for r, n in enumerate(rounds)]


@functools.lru_cache(maxsize=4)
def teacher_grid(diffusion, n, device):
    """The teacher's grid of n times and its alpha/sigma on the device, made once a round, not once
    a step."""
    return tuple(v.to(device) for v in diffusion.sampling_schedule(n, 'flowtime'))


def record(diffusion, steps, cfg, guidance):
    """What a student's checkpoint says of it (config['student']), so sample.py samples it as it was
    trained: DDIM on its 'flowtime' grid of `steps` times (0: a guidance-only student, any sampler),
    the CFG scales it learnt."""
    t = diffusion.sampling_schedule(steps, 'flowtime')[0].tolist() if steps else []
    return dict(steps=steps, t=t, cfg=list(cfg) if guidance else [])


class Distill:
    """Distillation as train.py's objective, in place of its plain one (train.Denoise, which has
    the same methods: the loop calls these and nothing else). It owns the rounds (each with its own
    LR schedule and EMA start), the teacher (a frozen copy of the model; net: what is called, the
    compiled one on CUDA), the switch from one round to the next, and what a checkpoint keeps."""

    def __init__(
        self, diffusion, model, model_args, ckpt, cfg, null_class, null_text, compile_mode=None
    ):
        """model, model_args: the student as built (the teacher's network and weights); ckpt: the
        teacher's checkpoint; cfg: train.py's settings (distill_*, max_iters)."""
        self.diffusion = diffusion
        # the first round's teacher: the student as built (resumed: load_state_dict restores it)
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        # its forwards cost more than the student's: compiled with it (CUDA)
        self.net = self.teacher
        if compile_mode:
            self.net = torch.compile(self.teacher, mode=compile_mode)
        # whether each takes the CFG scale as an input (else CFG's two halves)
        self.teacher_guided = bool(ckpt['model_args'].get('guidance'))
        self.student_guided = model_args['guidance']
        self.rounds = list(cfg['distill_steps'])
        self.cfg_range = cfg['distill_cfg']
        self.null_class = null_class
        self.null_text = null_text
        # each round's teacher calls per student step, and the step it ends at
        self.subs = teacher_substeps(self.rounds, cfg['distill_teacher_steps'])
        self.ends = round_ends(self.rounds, cfg['max_iters'], cfg['distill_iters'])
        # the current round
        self.r = 0

    def span(self, step):
        """The first step of step's round and the step it ends at (resumed at the end: the last)."""
        r = sum(step >= e for e in self.ends[:-1])
        return ([0] + self.ends)[r], self.ends[r]

    def begin(self, step, model, ema):
        """Before each step. A step that starts a later round makes the last round's student (the
        EMA) both the teacher and the student of this one; -> whether it did."""
        start, end = self.span(step)
        self.r = self.ends.index(end)
        if step != start or not self.r:
            return False
        self.teacher.load_state_dict(ema.state_dict())
        model.load_state_dict(ema.state_dict())
        return True

    def config(self, step):
        """What the checkpoint's config says of the student, so sample.py samples it as trained."""
        r = self.ends.index(self.span(step)[1])
        return {
            'student': record(self.diffusion, self.rounds[r], self.cfg_range, self.student_guided)
        }

    def loss(self, model, batch, draws):
        """The loss of a batch at its draws (noise, u) in the current round."""
        r = self.r
        teacher = (self.net, self.teacher_guided or r > 0)
        return distill_loss(
            self.diffusion,
            (model, self.student_guided),
            teacher,
            batch.x0,
            batch.y,
            draws.noise,
            draws.t,
            draws.u,
            self.rounds[r],
            self.cfg_range,
            self.null_class,
            batch.text,
            self.null_text,
            self.subs[r],
        )

    eval_loss = loss

    def calls(self):
        """Forward passes per example a step costs: the student's forward and backward (3), and
        the teacher's steps (CFG: two halves, unless the teacher takes the scale)."""
        r = self.r
        halves = 1 + (not (self.teacher_guided or r) and self.student_guided)
        return 3 + self.subs[r] * halves

    def round_file(self, step):
        """At a round's end, the file its student is kept in (sample.py --ckpt_name=...) and what
        it is; else None."""
        if step not in self.ends:
            return None
        n = self.rounds[self.ends.index(step)]
        if not n:
            return 'student_guided.pt', 'guidance student'
        return f"student{n}.pt", f"{n}-step student"

    def state_dict(self):
        return {'teacher': {'weights': self.teacher.state_dict(), 'guided': self.teacher_guided}}

    def load_state_dict(self, ckpt):
        self.teacher.load_state_dict(ckpt['teacher']['weights'])
        self.teacher_guided = ckpt['teacher']['guided']


def distill_loss(
    diffusion,
    student,
    teacher,
    x0,
    y,
    noise,
    t,
    u,
    steps,
    cfg,
    null_class,
    text=None,
    null_text=None,
    sub=2,
):
    """The loss of one batch; student, teacher: (network, whether it takes the CFG scale as an
    input). Each example's CFG scale is drawn from cfg by u[:, 1]; the teacher applies it by CFG
    (two halves) unless it takes it as an input. The student's output is fitted to distill_target's;
    in a round of steps, weighted so that the loss is max(SNR, 1) |x0 error|^2 (Salimans & Ho's
    "truncated SNR" weighting: the high-noise steps, where a sample's shape is decided, are not
    down-weighted as they are in a flow model's velocity or in v)."""
    w = (cfg[0] + u[:, 1] * (cfg[1] - cfg[0])).float()
    # -> fn(x, t)
    net = lambda m: guided(m[0], diffusion, y, null_class, w, text, null_text, scale_input=m[1])
    x_t, t, target = distill_target(diffusion, net(teacher), x0, noise, t, u[:, 0], steps, sub)
    per_example = (net(student)(x_t, t) - target).pow(2).mean(dim=(1, 2, 3))
    # guidance only: the plain error of the output, as training weighs it
    if not steps:
        return per_example.mean()
    # max(SNR, 1) |x0 error|^2
    return (per_example * diffusion.min_snr_weight(t, math.inf, floor=1.0)).mean()


@torch.no_grad()
def distill_target(diffusion, teacher_fn, x0, noise, t, u, steps, sub=2):
    """-> (x_t, t, the student's target output at x_t). teacher_fn(x, t): the teacher at objective
    times t [B]. steps = 0: at the time t, the teacher's output (guidance distillation: the
    teacher's is guided, the student's not). steps > 0: one DDIM step of the student on the
    `steps`-step 'flowtime' grid is fitted to `sub` DDIM steps of the teacher on the grid of sub
    times as many (the student's times are every sub-th of the teacher's); u [B] in [0, 1) picks
    each example's step (t is not used). The target is the output whose data prediction (to_x0)
    makes the student's DDIM step land where the teacher's steps did."""
    if steps:
        times, A, S = teacher_grid(diffusion, sub * steps, x0.device)
        # each example's step starts at teacher grid point k
        k = (u * steps).long().clamp(max=steps - 1) * sub
        t = times[k]
        col = lambda v, j: v[j].float().view(-1, 1, 1, 1)
    alpha, sigma = (s.float().view(-1, 1, 1, 1) for s in diffusion.alpha_sigma(t))
    x_t = alpha * x0 + sigma * noise
    if not steps:
        return x_t, t, teacher_fn(x_t, t)
    z = x_t
    # DDIM steps (eta = 0) of the teacher: grid point j -> j + 1
    for j in (k + i for i in range(sub)):
        a, s, a_n, s_n = col(A, j), col(S, j), col(A, j + 1), col(S, j + 1)
        x0_hat = diffusion.to_x0(teacher_fn(z, times[j]), z, a, s)
        z = a_n * x0_hat + s_n * (z - a * x0_hat) / s
    # the x0 whose DDIM step from x_t lands on z (the SNR rises along the grid: the divisor is > 0)
    a2, s2 = col(A, k + sub), col(S, k + sub)
    return (
        x_t,
        t,
        diffusion.from_x0((z - s2 / sigma * x_t) / (a2 - s2 / sigma * alpha), x_t, alpha, sigma),
    )
