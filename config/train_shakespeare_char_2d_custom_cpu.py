# The CPU recipe (config/train_shakespeare_char_cpu.py) on 4 processes as a 2-D cut of the 3d strategy:
# dp=2 x tp=2 (pp=1), variant "custom" (custom TP layers, custom FSDP over the data-parallel pairs).
# Same global batch as the single run: 12 sequences = micro-batch 6 x 1 micro-batch x dp 2.
#   torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char_2d_custom_cpu.py
# The other cuts: --dp_size=2 --pp_size=2 --tp_size=1 (dp x pp), --dp_size=1 --pp_size=2 --tp_size=2 (pp x tp;
# then also --gradient_accumulation_steps=2 --batch_size=6 keeps 12 sequences with 2 micro-batches).
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-2d-custom-cpu"
gradient_accumulation_steps = 2  # micro-batches per step over all data-parallel ranks (1 per pipeline)
batch_size = 6
eval_batch_size = 6  # 2 DP ranks x 6 = the single run's 12-sequence eval batches

parallel = "3d"
variant = "custom"
dp_size, pp_size, tp_size = 2, 1, 2
dp_type = "fsdp"
pp_schedule = "1f1b"
