"""Per-device work of one DEFT round: the skipped backward is really skipped.

Each device of the round takes one branch of the `lax.switch` (its block's truncated
forward-backward, or nothing when idle); this compiles every branch on its own for one
device's batch (shapes only, layer loops unrolled so XLA counts every layer) and prints XLA's
FLOPs per device next to the cost model's, and next to a full backward (single-device step
without the optimizer) for scale.

    python experiments/deft_branch_flops.py --devices 4 --blocks 4 --batch 32 --seq 64
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--adapter", default="houlsby")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32, help="examples per device")
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)

    from ringjax.methods.deft import block_sizes, branch_flops
    from ringjax.models.heads import HeadConfig
    from ringjax.peft import preset
    from ringjax.plan.cli import model_config
    from ringjax.plan.costs import step_costs

    cfg, spec = model_config(args.model), preset(args.adapter)
    K = args.blocks or min(args.devices, cfg.num_layers)
    sizes = block_sizes(cfg.num_layers, K)
    rows = branch_flops(cfg, spec, HeadConfig("classification", 2), sizes, args.batch, args.seq,
                        num_devices=args.devices)
    full = step_costs(cfg, spec, args.batch, args.seq, optimizer=False).flops
    for row in rows:
        layers = "idle" if row["block"] is None else f"block {row['block']} (layers {row['layers'][0]}-{row['layers'][1] - 1})"
        print(f"device {row['device']}: {layers:24s} XLA {row['xla_flops'] / 1e9:7.2f} GFLOP   model "
              f"{row['model_flops'] / 1e9:7.2f} GFLOP   {row['xla_flops'] / full:5.1%} of a full backward")
    print(f"full forward-backward (every layer's adapters, model): {full / 1e9:.2f} GFLOP")
    result = {"model": args.model, "adapter": args.adapter, "batch_per_device": args.batch, "seq": args.seq,
              "sizes": list(sizes), "rows": rows, "full_model_flops": full}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
