# The CPU recipe (config/train_shakespeare_char_cpu.py) with fully sharded data parallelism over 2 processes,
# FSDP variant "pytorch" (ZeRO-3: parameters, gradients and Adam state sharded over the ranks).
# Same global batch as the single run: 2 micro-batches of 6 sequences, one per rank.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_fsdp_pytorch_cpu.py
out_dir = "out-shakespeare-char-fsdp-pytorch-cpu"
eval_interval = 250
eval_iters = 20
log_interval = 1
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 2  # global: one micro-batch per rank on 2 ranks
batch_size = 6
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False

parallel = "fsdp"
variant = "pytorch"
