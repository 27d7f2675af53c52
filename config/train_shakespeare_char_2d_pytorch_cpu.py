# The CPU recipe (config/train_shakespeare_char_cpu.py) on 4 processes as a 2-D cut of the 3d strategy:
# dp=2 x tp=2 (pp=1, a one-stage pipeline), variant "pytorch" (DTensor TP with sequence and loss parallelism,
# FSDP2 over the data-parallel pairs).
# Same global batch as the single run: 12 sequences = micro-batch 6 x 1 micro-batch x dp 2.
#   torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char_2d_pytorch_cpu.py
# The other cuts: --dp_size=2 --pp_size=2 --tp_size=1 --gradient_accumulation_steps=4 --batch_size=3 (dp x pp: the
# pytorch 1F1B needs as many micro-batches per pipeline as stages), --dp_size=1 --pp_size=2 --tp_size=2
# --gradient_accumulation_steps=2 --batch_size=6 (pp x tp).
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-2d-pytorch-cpu"
gradient_accumulation_steps = 2  # micro-batches per step over all data-parallel ranks (1 per pipeline)
batch_size = 6
eval_batch_size = 6  # 2 DP ranks x 6 = the single run's 12-sequence eval batches

parallel = "3d"
variant = "pytorch"
dp_size, pp_size, tp_size = 2, 1, 2
dp_type = "fsdp"
pp_schedule = "1f1b"
sequence_parallel = True
loss_parallel = True
