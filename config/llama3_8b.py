# Llama 3 8B (Dubey et al. 2024, "The Llama 3 Herd of Models", table 3; Meta's released config.json): 32 layers,
# 4096 wide, 32 query heads sharing 8 key/value heads (grouped-query attention), SwiGLU MLP of 14336, vocabulary
# 128256, RoPE base 500000, 8192 positions. One difference: model.py ties the output head to the token embedding
# (7.50B parameters; Meta's 8B has a separate 128256 x 4096 head: 8.03B).
#   python -m sim config/llama3_8b.py --gpus=64                 # step time, MFU and memory on 8 DGX nodes
#   python -m sim config/llama3_8b.py --gpus=64 --plan          # the fastest layouts
# It trains at toy scale on a CPU with overrides (tests/test_moe.py does), e.g.
#   python train.py config/llama3_8b.py --parallel=single --n_layer=2 --n_embd=64 --n_head=4 --n_kv_head=2 \
#       --ffn_hidden=128 --vocab_size=0 --block_size=64 --batch_size=4 --gradient_accumulation_steps=1 \
#       --dataset=shakespeare_char --compile=False --dtype=float32
out_dir = "out-llama3-8b"
dataset = "openwebtext"  # GPT-2 BPE ids (< 50257) in a 128256-row embedding; Llama 3's tokenizer is tiktoken-based

block = "llama"
n_layer = 32
n_embd = 4096
n_head = 32
n_kv_head = 8
ffn_hidden = 14336
vocab_size = 128256
rope_theta = 500000.0
block_size = 8192
bias = False
dropout = 0.0

batch_size = 1                     # micro-batch per rank
gradient_accumulation_steps = 512  # 512 sequences of 8192: 4M tokens per step (our choice; the paper gives 405B's)
learning_rate = 3e-4               # Llama 3 8B's peak learning rate (Meta's model card)
min_lr = 3e-5
warmup_iters = 2000

parallel = "3d"
tp_size = 8                        # tensor parallel inside a node (32 heads, 8 kv heads, 14336 all divide by 8)
dp_size = 0                        # the rest of the GPUs, FSDP
dp_type = "fsdp"
sequence_parallel = True
loss_parallel = True
dtype = "bfloat16"
