# The CPU recipe (config/train_shakespeare_char_cpu.py) as a 2-stage pipeline, variant "custom", interleaved 1F1B
# with 2 virtual stages per rank. Same global batch as the single run: 4 micro-batches of 3 sequences (12).
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_pp_interleaved_cpu.py
from config.train_shakespeare_char_pp_custom_cpu import *  # noqa: F403  (below, what differs)

out_dir = "out-shakespeare-char-pp-interleaved-cpu"
pp_schedule = "interleaved_1f1b"
pp_virtual_stages = 2  # 4 virtual stages of one layer: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3
