# The built-in demo: a class-conditional model of 32 px coloured shapes, trained on a 2-core CPU in
# about 4 minutes with bf16 instructions (cpu_bf16), 6 without:
#   python prepare.py && python train.py config/shapes.py
#   python sample.py --out_dir=out-shapes --grade=True
out_dir = 'out-shapes'
data_dir = 'data/shapes'
# a small conv UNet (32-64-64 channels, attention at 8x8): convolutions learn shapes from far fewer
# images than a patch-4 DiT, which is what matters on a CPU (see README, "Why a UNet for shapes")
arch = 'unet'
unet_channels = 32
unet_mult = (1, 2, 2)
unet_blocks = 1
n_head = 4
objective = 'flow'
batch_size = 32
max_iters = 1200
lr = 1e-3
min_lr = 1e-4
# a short run: let Adam's second moment adapt faster than the usual 0.999
beta2 = 0.99
warmup_iters = 100
ema_decay = 0.995
ema_start = 200
log_interval = 100
# bf16 autocast on a CPU with bf16 instructions (AVX-512 BF16, AMX), fp32 on others (RESULTS.md)
cpu_bf16 = True
# evaluate, checkpoint and draw a sample grid at the end only: it is a short run
eval_interval = 0
eval_batches = 4
# read the eval grid's 8 samples per class back: accuracy + factor FD in the log, ~1.5 s
eval_grade_per_class = 8
