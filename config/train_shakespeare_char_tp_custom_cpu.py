# The CPU recipe (config/train_shakespeare_char_cpu.py) with tensor parallelism over 2 processes, variant "custom",
# with sequence and loss parallelism. Every rank reads the same (whole) batch, so the global batch is the single
# run's: 1 micro-batch of 12 sequences. 4 heads, 128 dim, MLP 512 and block 64 divide by 2; the 65-character
# vocabulary splits 33 + 32.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_tp_custom_cpu.py
out_dir = "out-shakespeare-char-tp-custom-cpu"
eval_interval = 250
eval_iters = 20
log_interval = 1
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
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

parallel = "tp"
variant = "custom"
sequence_parallel = True
loss_parallel = True
