"""
Simulate a training run before renting the cluster: step time, tokens/s, MFU, memory per device, a timeline,
or a search for the fastest layout. Takes train.py's config files and --key=value overrides, plus the
simulator's keys (sim/config.py): cluster, gpus / nodes, cp_size, zero_stage, recompute, flash_attention,
overlap_grad_reduce, matmul_efficiency, timeline, plan, global_batch, top (vocab_size is train.py's key).

    python -m sim config/gpt3_175b.py --cluster=a100-80gb --gpus=1024          # Megatron-LM's GPT-3 run
    python -m sim config/gpt3_175b.py --gpus=1024 --pp_size=16 --timeline=out.png
    python -m sim config/gpt3_175b.py --gpus=1024 --plan                         # the fastest layouts
    python -m sim config/train_shakespeare_char_ddp_custom_cpu.py --cluster=cpu-local --gpus=2

Exits with status 1 and a one-line error when the layout is impossible or does not fit in memory.
"""

import sys

from config import ConfigError


def main(argv):
    from sim.config import build, load
    from sim.schedule import simulate

    cfg = load(argv)
    model, par, cluster = build(cfg)
    print(f"model: {model.n_layer} layers, h={model.n_embd}, {model.n_head} heads, s={model.seq_len}, "
          f"V={model.vocab_size}, {model.params / 1e9:.3g}B parameters; global batch {par.global_batch} sequences "
          f"({par.global_batch * model.seq_len:,} tokens); {par.world} x {cluster.name} "
          f"({cluster.nodes} node(s) of up to {cluster.gpus_per_node}), {par.dtype}")
    if cfg["plan"]:
        from sim.planner import plan, table
        results = plan(model, par, cluster, global_batch=cfg["global_batch"] or par.global_batch, top=cfg["top"])
        print(table(results))
        return 0
    step = simulate(model, par, cluster, layers_per_task=cfg["layers_per_task"])
    print(step.report())
    if cfg["timeline"]:
        from sim.timeline import draw
        print(f"wrote {draw(step, cfg['timeline'])}")
    if not step.fits:
        worst = max(step.memory, key=lambda m: m["total"])
        raise ValueError(f"does not fit: {worst['total'] / 1e9:.1f} GB needed per device, "
                         f"{cluster.hbm_bytes / 1e9:.1f} GB on a {cluster.name} device")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
