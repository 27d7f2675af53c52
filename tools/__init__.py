"""
What a user runs beside training, and the trainer's helpers that are not parallelism:

- tools/hf.py: GPT-2 and Llama weights between Hugging Face and model.py's names (train.py's and sample.py's
  init_from), and the export command: `python -m tools.hf export --out_dir=out-x`.
- tools/profiling.py: profiler traces, CUDA memory snapshots, peak memory per rank, and the GPU peak FLOP/s table
  train.py's MFU divides by.
- tools/plot_loss.py: the loss curves of several runs in one PNG: `python -m tools.plot_loss out-a out-b`.
- tools/gpu_check.py: the one command for a machine with a GPU: `python -m tools.gpu_check` (make gpu-check).
"""
