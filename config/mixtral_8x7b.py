# Mixtral 8x7B (Jiang et al. 2024, "Mixtral of Experts", table 1; Mistral's released config.json): 32 layers, 4096
# wide, 32 query heads over 8 key/value heads, every block's feed-forward 8 SwiGLU experts of 14336 of which each
# token uses 2, vocabulary 32000, RoPE base 1e6, 32768 positions (trained here on 4096). model.py ties the head to the
# embedding (46.6B parameters; Mistral's 46.7B has a separate 32000 x 4096 head); 12.7B active per token.
# A configuration for the simulator (expert parallelism over the data-parallel ranks, TP inside a node):
#   python -m sim config/mixtral_8x7b.py --gpus=128
#   python -m sim config/mixtral_8x7b.py --gpus=128 --expert_imbalance=1.2     # the busiest rank gets 20% more
#   python -m sim config/mixtral_8x7b.py --gpus=128 --plan
out_dir = "out-mixtral-8x7b"
dataset = "openwebtext"

block = "llama"
n_layer = 32
n_embd = 4096
n_head = 32
n_kv_head = 8
ffn_hidden = 14336
vocab_size = 32000
rope_theta = 1000000.0
block_size = 4096
bias = False
dropout = 0.0
n_expert = 8
n_expert_per_token = 2
moe_every = 1
moe_aux_loss_coef = 0.02           # Mixtral's router_aux_loss_coef

batch_size = 1
gradient_accumulation_steps = 1024  # 1024 sequences of 4096: 4M tokens per step (our choice)
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000

parallel = "3d"
tp_size = 4
pp_size = 4                        # 8 layers per stage: 8 x 176M expert weights per device
ep_size = 8                        # the 8 experts over the 8 data-parallel ranks: one expert per rank
dp_size = 0
dp_type = "fsdp"
sequence_parallel = True
loss_parallel = True
dtype = "bfloat16"
