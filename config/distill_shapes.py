# Distil the demo model (config/shapes.py, out-shapes/ckpt.pt) into students of 2 and 1 steps that
# take the CFG scale as an input: one network call per step. Rounds of 1,400 and 600 steps; each
# student is kept (out-distill/student2.pt, student1.pt):
#   python train.py config/distill_shapes.py
#   python sample.py --out_dir=out-distill --ckpt_name=student1.pt --grade=True
# A 4-step student too (RESULTS.md): add --distill_steps="(4, 2, 1)" --distill_teacher_steps=16
#   --max_iters=1200 --batch_size=32 --lr=5e-4
out_dir = 'out-distill'
data_dir = 'data/shapes'
# the teacher: its EMA weights, with CFG
init_from = 'out-shapes/ckpt.pt'
distill_steps = (2, 1)
# the first round's target: 4 teacher DDIM steps per student step, not 2: closer
distill_teacher_steps = 8
distill_cfg = (1.0, 6.0)
# the teacher's (train.py checks that it is)
objective = 'flow'
# half of 32, twice the steps in the same time: 1 step +1.1 points (README)
batch_size = 16
max_iters = 2000
# the first round is the one that needs the steps (README: 1,000 each lose 0.9 points)
distill_iters = (1400, 600)
# CPU autocast: 1.5x the steps/s on CPUs with AVX-512 BF16 or AMX, the same students
# (README); on a CPU without them it is slower: --dtype=float32
dtype = 'bfloat16'
lr = 1e-3
min_lr = 5e-5
beta2 = 0.99
warmup_iters = 20
ema_decay = 0.99
ema_start = 50
log_interval = 100
# evaluate, checkpoint and draw a grid at each round's end
eval_interval = 0
eval_batches = 4
eval_grade_per_class = 8
# the eval grid's and grade's scale
cfg_scale = 4.0
# a guided student never needs the unconditional output
class_dropout = 0.0
