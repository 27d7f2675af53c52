# The CPU recipe (config/train_shakespeare_char_cpu.py) on 2 processes with tensor parallelism, variant "custom",
# with sequence and loss parallelism. Every rank reads the same (whole) batch, so the global batch is the single
# run's as it stands (1 micro-batch of 12 sequences). 4 heads, 128 dim, MLP 512 and block 64 divide by 2; the
# 65-character vocabulary splits 33 + 32.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_tp_custom_cpu.py
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-tp-custom-cpu"

parallel = "tp"
variant = "custom"
sequence_parallel = True
loss_parallel = True
