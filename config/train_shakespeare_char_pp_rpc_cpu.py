# The CPU recipe (config/train_shakespeare_char_cpu.py) as a 2-stage pipeline, variant "rpc": GPipe driven by rank 0
# through torch.distributed.rpc (remote stages, RRefs, distributed autograd). Same global batch as the single run:
# 4 micro-batches of 3 sequences (12), the same sequences; eval on 12-sequence batches.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_pp_rpc_cpu.py
from config.train_shakespeare_char_pp_custom_cpu import *  # noqa: F403  (below, what differs)

out_dir = "out-shakespeare-char-pp-rpc-cpu"
variant = "rpc"
pp_schedule = "gpipe"  # the only schedule of the rpc variant
