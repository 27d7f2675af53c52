# nanoGPT's finetuning recipe: GPT-2 XL (1.5B) from the Hugging Face weights on tiny-shakespeare in GPT-2 BPE,
# 20 iterations of 32 sequences of 1024 tokens at a constant 3e-5, keeping the best checkpoint (nanoGPT: val loss
# ~1.0 after a few minutes on one A100). tools/hf.py reads the weights (the Hugging Face cache, downloaded if allowed).
#   python data/shakespeare/prepare.py
#   python train.py config/finetune_shakespeare.py                      # one GPU (~40 GB with AdamW's state)
#   torchrun --standalone --nproc_per_node=8 train.py config/finetune_shakespeare.py --parallel=fsdp
#   python sample.py --out_dir=out-shakespeare --start="ROMEO:"
# Smaller GPT-2s: --init_from=gpt2 (124M), gpt2-medium, gpt2-large. The model takes GPT-2's sizes and its
# 50257-token vocabulary (n_layer, n_head, n_embd, bias and the 50304 padding of train.py are not used).
import time

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = "shakespeare"
wandb_run_name = "ft-" + str(time.time())

dataset = "shakespeare"
init_from = "gpt2-xl"  # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
