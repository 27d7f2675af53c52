# The CPU recipe (config/train_shakespeare_char_cpu.py) on 8 processes as dp=2 x pp=2 x tp=2, variant "pytorch":
# DTensor TP with sequence and loss parallelism, torch.distributed.pipelining's 1F1B, FSDP2 over the data-parallel
# pairs (torchtitan's order). 4 heads, 128 dim, MLP 512 and block 64 divide by tp=2 (the 65-character vocabulary
# splits 33 + 32); 4 layers make 2 stages of 2.
# Same global batch as the single run: 12 sequences = micro-batch 3 x 2 micro-batches per pipeline x dp 2.
#   torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare_char_3d_pytorch_cpu.py
# DP as DDP (FSDP2's replicate): --dp_type=ddp. Interleaved: --pp_schedule=interleaved_1f1b --pp_virtual_stages=2.
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-3d-pytorch-cpu"
gradient_accumulation_steps = 4  # micro-batches per step over all data-parallel ranks (2 per pipeline)
batch_size = 3
eval_batch_size = 6  # 2 DP ranks x 6 = the single run's 12-sequence eval batches

parallel = "3d"
variant = "pytorch"
dp_size, pp_size, tp_size = 2, 2, 2
dp_type = "fsdp"
pp_schedule = "1f1b"
sequence_parallel = True
loss_parallel = True
