# The CPU recipe (config/train_shakespeare_char_cpu.py) on 2 processes with fully sharded data parallelism (ZeRO-3:
# parameters, gradients and Adam state sharded), variant "pytorch". The same global batch as the single run: 2
# micro-batches of 6 sequences, one per rank.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_fsdp_pytorch_cpu.py
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-fsdp-pytorch-cpu"
gradient_accumulation_steps = 2  # global: one micro-batch per rank on 2 ranks
batch_size = 6

parallel = "fsdp"
variant = "pytorch"
