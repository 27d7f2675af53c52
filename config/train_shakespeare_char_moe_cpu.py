# The CPU recipe (config/train_shakespeare_char_cpu.py) with mixture-of-experts feed-forwards: every block's MLP is 8
# experts of which each token uses 2 (Mixtral's routing, dropless), experts sharded over 2 processes by expert
# parallelism (parallel/ep.py, custom variant: all-to-alls over our Collectives), the dense weights data-parallel.
# The log line and metrics.jsonl carry the load-balancing loss and the tokens each expert got.
# Same global batch as the single run: 12 sequences = micro-batch 3 x 4 micro-batches over the 2 ranks.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_moe_cpu.py
# (the same model on one process: --parallel=single --variant=pytorch --eval_batch_size=12)
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-moe-cpu"
gradient_accumulation_steps = 4  # micro-batches per step over all data-parallel ranks
batch_size = 3
eval_batch_size = 6  # 2 ranks x 6 = the single run's 12-sequence eval batches

n_expert = 8
n_expert_per_token = 2
moe_every = 1
moe_aux_loss_coef = 0.01

parallel = "ep"
variant = "custom"
