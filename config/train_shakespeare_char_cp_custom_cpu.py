# The CPU recipe (config/train_shakespeare_char_cpu.py) on 2 processes with context parallelism, variant "custom":
# every sequence of 64 tokens split over the 2 ranks (chunks 0 and 3 on rank 0, 1 and 2 on rank 1: the zigzag),
# ring attention written out over our Collectives. Every rank reads the single run's batch.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_cp_custom_cpu.py
# Long sequences are what CP is for: --block_size=1024 --batch_size=4 (docs/strategies.md, Ring attention).
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-cp-custom-cpu"
parallel = "cp"
variant = "custom"
