# The CPU recipe (config/train_shakespeare_char_cpu.py) on 8 processes as dp=2 x pp=2 x tp=2, variant "custom":
# custom TP layers, the custom 1F1B pipeline and the custom FSDP (ZeRO-3) over the data-parallel pairs.
# Same global batch as the single run: 12 sequences = micro-batch 3 x 2 micro-batches per pipeline x dp 2.
#   torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char_3d_custom_cpu.py
# DP as DDP: --dp_type=ddp. With sequence and loss parallelism: --sequence_parallel=True --loss_parallel=True.
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-3d-custom-cpu"
gradient_accumulation_steps = 4  # micro-batches per step over all data-parallel ranks (2 per pipeline)
batch_size = 3
eval_batch_size = 6  # 2 DP ranks x 6 = the single run's 12-sequence eval batches

parallel = "3d"
variant = "custom"
dp_size, pp_size, tp_size = 2, 2, 2
dp_type = "fsdp"
pp_schedule = "1f1b"
