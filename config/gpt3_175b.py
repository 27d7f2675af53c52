# GPT-3 175B as Megatron-LM trained it (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
# Clusters Using Megatron-LM", section 5): 96 layers, h=12288, 96 heads, s=2048, vocabulary 51200 (the simulator's
# --vocab_size; train.py takes it from the dataset), global batch 1536 sequences in micro-batches of 1,
# tensor parallel 8 inside a DGX A100 node, pipeline parallel 8 across nodes, data parallel over the rest.
# A config for sim/__main__.py (train.py accepts every key here too); Megatron's 2021 run (simulator-only keys):
#   python -m sim config/gpt3_175b.py --gpus=1024 --vocab_size=51200 --recompute=full --flash_attention=False
# predicts 151.7 TFLOP/s per GPU against the paper's 140 (docs/simulator.md).
out_dir = "out-gpt3-175b"
dataset = "openwebtext"

n_layer = 96
n_head = 96
n_embd = 12288
block_size = 2048
dropout = 0.1
bias = True

batch_size = 1                      # micro-batch per rank
gradient_accumulation_steps = 1536  # micro-batches per step over all data-parallel ranks: 1536 sequences

parallel = "3d"
tp_size = 8
pp_size = 8
dp_size = 0                         # the rest: 1024 / (8 * 8) = 16 on 1024 GPUs
pp_schedule = "1f1b"
dp_type = "ddp"                     # Megatron-LM 2021: plain data parallelism, no ZeRO (zero_stage 0)
sequence_parallel = False           # Megatron-LM 2021 had no sequence parallelism (Korthikanti et al. 2022 came later)
loss_parallel = True                # vocab-parallel cross-entropy
dtype = "bfloat16"                  # the paper used fp16 mixed precision: the same peak (312 TFLOP/s)
