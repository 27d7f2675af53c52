# nanoGPT's recipe for reproducing GPT-2 (124M) on OpenWebText, for GPU machines: 12 layers, 12 heads, 768 dim,
# block 1024, ~0.5M tokens per iteration (12 sequences x 1024 tokens x 40 micro-batches over all data-parallel
# ranks), 600k iterations of AdamW at 6e-4 with 2000 warm-up iterations and cosine decay to 6e-5, weight decay 0.1,
# gradient clipping at 1.0, bf16 autocast and torch.compile (train.py's defaults). nanoGPT reaches val loss ~2.85
# in ~4 days on one node of 8 A100 40GB.
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# Sharded instead of replicated: --parallel=fsdp (ZeRO-3), or --parallel=3d --tp_size=2 ...; less activation
# memory: --activation_checkpoint=selective (or full). Profile a few steps: --profile=True.
out_dir = "out-gpt2"
wandb_log = False  # nanoGPT logs to wandb (project "owt"); turn on where wandb is set up
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

dataset = "openwebtext"
# these make the total batch size be ~0.5M
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8  # over all data-parallel ranks: 5 per GPU on 8 GPUs

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

# this makes total number of tokens be 300B
max_iters = 600000
lr_decay_iters = 600000

# eval stuff
eval_interval = 1000
eval_iters = 200
log_interval = 10

# weight decay
weight_decay = 1e-1

parallel = "ddp"
variant = "pytorch"
