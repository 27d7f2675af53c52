"""
Benchmarks: each prints the figures docs/ quotes, measured on this machine (run from the repository root).

- bench/throughput.py: tokens/s of single, DDP and FSDP, both variants, on the CPU recipe (make bench).
- bench/ac.py: peak step memory and ms/step of each activation checkpointing mode, per strategy.
- bench/checkpoint.py: the stall per checkpoint (sync vs async) and the restart time, on train.py.
- bench/zero.py: memory per rank and ms/step of ddp, ZeRO-1, ZeRO-2 and fsdp side by side.
- bench/comm.py: all-reduce latency and bus bandwidth of every Collectives backend (torchrun -m bench.comm).
"""
