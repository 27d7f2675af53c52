# The CPU recipe (config/train_shakespeare_char_cpu.py) as a 2-stage pipeline, variant "custom", 1F1B schedule.
# Same global batch as the single run: 4 micro-batches of 3 sequences (12), the same sequences.
#   torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_pp_custom_cpu.py
# Other schedules: --pp_schedule=gpipe, or --pp_schedule=interleaved_1f1b --pp_virtual_stages=2
# (2 chunks of 1 layer per rank; micro-batches a multiple of the pipeline size).
from config.train_shakespeare_char_cpu import *  # noqa: F403  (the recipe; below, what differs)

out_dir = "out-shakespeare-char-pp-custom-cpu"
gradient_accumulation_steps = 4  # pipeline micro-batches per step (every rank reads all of them)
batch_size = 3
eval_batch_size = 12  # evaluate on the single run's 12-sequence batches (the same val estimate), not 3-row ones

parallel = "pp"
variant = "custom"
pp_schedule = "1f1b"
