"""
A parallelism simulator: predict the step time, throughput, MFU and memory of training a GPT with DP (ZeRO 0-3),
TP (+ sequence parallelism), PP (GPipe, 1F1B, interleaved 1F1B) and CP (ring attention) on a cluster, before
renting it.

    python -m sim config/gpt3_175b.py --cluster=a100-80gb --gpus=1024
    python -m sim config/train_shakespeare_char_cpu.py --cluster=cpu-local --parallel=ddp --gpus=2

- sim/cluster.py   devices and links (A100, H100 presets; this CPU machine, calibrated)
- sim/cost.py      FLOPs, bytes, seconds and memory of the pieces of a step, from the model's shapes
- sim/compute.py   one kernel's time from its shape (GEMM tiles and waves over the SMs, memory-bound kernels)
- sim/published.py published GEMM and training throughputs with their sources
- sim/validate.py  fit the shape model's constants to them; the leave-one-out table (python -m sim.validate)
- sim/schedule.py  the discrete-event simulation of one step (compute and communication streams per device)
- sim/planner.py   search over (dp, tp, pp, cp, v, micro-batch, ZeRO stage, recompute) for the fastest layout
- sim/timeline.py  the simulated step as a PNG (devices x {compute, communication} lanes)
- sim/calibrate.py fit cpu-local from timed train.py runs and gloo collectives; predict held-out runs
- sim/config.py    train.py's config files and --key=value overrides -> (Model, Parallel, Cluster)
"""
