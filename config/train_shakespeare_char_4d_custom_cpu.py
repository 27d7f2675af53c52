# The CPU recipe (config/train_shakespeare_char_cpu.py) on 16 processes as dp=2 x pp=2 x cp=2 x tp=2, variant
# "custom": Megatron's TP layers with sequence and loss parallelism, ring attention over each CP pair, the custom
# 1F1B pipeline, and the custom FSDP (ZeRO-3) over the dp x cp ranks that hold the same weights.
# Same global batch as the single run: 12 sequences = micro-batch 3 x 2 micro-batches per pipeline x dp 2.
#   torchrun --standalone --nproc_per_node=16 train.py config/train_shakespeare_char_4d_custom_cpu.py
# (16 processes on a 2-core machine: it runs, slowly; it is here to show the grid, e.g. --max_iters=50.)
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-4d-custom-cpu"
gradient_accumulation_steps = 4  # micro-batches per step over all data-parallel ranks (2 per pipeline)
batch_size = 3
eval_batch_size = 6  # 2 DP ranks x 6 = the single run's 12-sequence eval batches

parallel = "3d"
variant = "custom"
dp_size, pp_size, cp_size, tp_size = 2, 2, 2, 2
dp_type = "fsdp"
pp_schedule = "1f1b"
sequence_parallel = True
loss_parallel = True
