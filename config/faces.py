# The GPU recipe (not yet run): 256 px faces as 32x32x4 sd-vae-ft-mse latents, DiT-B/2.
# The data: any folder of face images, e.g. AFHQ (github.com/clovaai/stargan-v2's download.sh:
# afhq/train/{cat,dog,wild}, 3 classes), CelebA-HQ or FFHQ (one folder: unconditional); class
# sub-folders become labels.
#   python prepare.py --dataset=path/to/faces --resolution=256 \
#       --vae=stabilityai/sd-vae-ft-mse --out_dir=data/faces
#   python train.py config/faces.py
#   python sample.py --out_dir=out-faces
# Eight GPUs: the global batch is batch_size x GPUs, so the same 256 needs --batch_size=32:
#   torchrun --standalone --nproc_per_node=8 train.py config/faces.py --batch_size=32
out_dir = 'out-faces'
data_dir = 'data/faces'
arch = 'dit'
# DiT-B/2: 12 layers, 12 heads, 768 wide; 16x16 = 256 tokens per 32x32 latent
patch_size = 2
n_layer = 12
n_head = 12
n_embd = 768
objective = 'flow'
batch_size = 256
max_iters = 100000
lr = 1e-4
min_lr = 1e-5
warmup_iters = 1000
# as DiT
weight_decay = 0.0
ema_decay = 0.9999
ema_start = 1000
log_interval = 100
eval_interval = 5000
# bf16 on A100/H100
dtype = 'auto'
compile = True
