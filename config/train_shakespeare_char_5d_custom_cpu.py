# The CPU recipe with MoE feed-forwards (config/train_shakespeare_char_moe_cpu.py's) on all five dimensions:
# 16 processes as dp=2 x pp=2 x cp=2 x tp=2, with expert parallelism ep=4 carved out of the 4 dp x cp ranks that hold
# the same dense weights (each MoE layer's 8 experts, 2 per rank, tokens dispatched by all-to-all among those 4), the
# custom variant: Megatron's TP layers with sequence and loss parallelism (experts unsplit by TP), ring attention over
# each CP pair (4 query heads over 2 key/value heads), the custom 1F1B pipeline, the custom FSDP for the dense weights.
# Same global batch as the single run: 12 sequences = micro-batch 3 x 2 micro-batches per pipeline x dp 2.
#   python -c "from parallel.grid import print_grid; print_grid(dp=2, pp=2, cp=2, tp=2, ep=4)"
#   torchrun --standalone --nproc_per_node=16 train.py config/train_shakespeare_char_5d_custom_cpu.py
# (16 processes on a 2-core machine: it runs, slowly; it is here to show the grid, e.g. --max_iters=20.)
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-5d-custom-cpu"
gradient_accumulation_steps = 4  # micro-batches per step over all data-parallel ranks (2 per pipeline)
batch_size = 3
eval_batch_size = 6  # 2 DP ranks x 6 = the single run's 12-sequence eval batches

n_kv_head = 2
n_expert = 8
n_expert_per_token = 2
moe_every = 1
moe_aux_loss_coef = 0.01

parallel = "3d"
variant = "custom"
dp_size, pp_size, cp_size, tp_size, ep_size = 2, 2, 2, 2, 4
dp_type = "fsdp"
pp_schedule = "1f1b"
sequence_parallel = True
loss_parallel = True
