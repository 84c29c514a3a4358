"""The analytic cost model against XLA, over methods and unfreeze depths, for MiniLM and a
BERT-base-shaped model (random weights; everything is lowered from shapes, nothing materialised).

For each point: total training-step FLOPs (`step_costs(...).flops`) against XLA's
`cost_analysis()["flops"]` of the step compiled with unrolled layer loops, and peak bytes
(`step_costs(...).peak_bytes`) against `memory_analysis()` of the step as it runs (argument +
output + temp - alias). Prints one line per point and the worst errors; `--json` writes them.
XLA figures are cached per point in `--cache` (keyed by the step's source and the JAX version).

    python experiments/deft_costs_vs_xla.py                 # the whole grid (minutes per point on 2 cores)
    python experiments/deft_costs_vs_xla.py --models minilm --methods houlsby,full --json out.json
"""

from __future__ import annotations

import argparse
import json

BERT_BASE = dict(arch="bert", vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, max_position=512, norm_eps=1e-12, activation="gelu", type_vocab_size=2)
# (method, depth or top_t); None: the method's own default
GRID = {
    "minilm": [("full", 1), ("full", 3), ("full", 6), ("lora", 1), ("lora", 3), ("lora", 6),
               ("houlsby", 1), ("houlsby", 3), ("houlsby", 6), ("pfeiffer", 1), ("pfeiffer", 3), ("pfeiffer", 6),
               ("parallel", None), ("top-t", 1), ("top-t", 3), ("top-t", 6)],
    "bert-base": [("full", 6), ("full", 12), ("lora", 6), ("houlsby", 1), ("houlsby", 12), ("pfeiffer", 12),
                  ("parallel", None), ("top-t", 2)],
}


def model_config(name: str):
    from ringjax.models import hub
    from ringjax.models.config import ModelConfig

    return ModelConfig(**BERT_BASE) if name == "bert-base" else hub.load_config(hub.resolve(name))


def method_config(method: str, depth):
    from ringjax.peft import preset

    return preset("top-t", top_t=depth) if method == "top-t" else preset(method)


def check_point(model: str, method: str, depth, batch: int, seq: int, cache: str | None) -> dict:
    from ringjax.plan.costs import compiled_step_costs, step_costs

    cfg, spec = model_config(model), method_config(method, depth)
    step_depth = None if method in ("top-t", "parallel") else depth
    xla = compiled_step_costs(cfg, spec, batch, seq, step_depth, cache_dir=cache)
    ours = step_costs(cfg, spec, batch, seq, step_depth)
    return {"model": model, "method": method, "depth": depth, "flops": ours.flops, "xla_flops": xla["flops"],
            "flops_error": ours.flops / xla["flops"] - 1, "peak_bytes": ours.peak_bytes,
            "xla_peak_bytes": xla["peak_bytes"], "peak_error": ours.peak_bytes / xla["peak_bytes"] - 1}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--methods", default=None, help="comma list (default: all in the grid)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--cache", default="/tmp/ringjax-xla-costs")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    methods = None if args.methods is None else set(args.methods.split(","))
    rows = []
    for model in args.models.split(","):
        for method, depth in GRID[model]:
            if methods is not None and method not in methods:
                continue
            row = check_point(model, method, depth, args.batch, args.seq, args.cache)
            rows.append(row)
            print(f"{model:9s} {method:8s} depth {str(depth):4s}  FLOPs {row['flops'] / 1e9:8.2f} G vs XLA "
                  f"{row['xla_flops'] / 1e9:8.2f} G ({row['flops_error']:+.1%})   peak {row['peak_bytes'] / 2**20:8.1f} "
                  f"MiB vs XLA {row['xla_peak_bytes'] / 2**20:8.1f} MiB ({row['peak_error']:+.1%})", flush=True)
    if rows:
        worst_f = max(rows, key=lambda r: abs(r["flops_error"]))
        worst_m = max(rows, key=lambda r: abs(r["peak_error"]))
        print(f"worst FLOPs error {worst_f['flops_error']:+.2%} ({worst_f['model']} {worst_f['method']} "
              f"{worst_f['depth']}); worst peak-bytes error {worst_m['peak_error']:+.2%} ({worst_m['model']} "
              f"{worst_m['method']} {worst_m['depth']}); {len(rows)} points, batch {args.batch} x {args.seq}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
