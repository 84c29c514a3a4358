"""DEFT on SST-2 with MiniLM over emulated devices, against single-device Houlsby adapters.

DEFT trains Houlsby adapters in K depth blocks over N devices (each device samples
`--batch-size` examples per round from its own IID shard and backpropagates only down to its
block); the baseline trains the same adapters on one device, `--batch-size` examples per step,
for as many steps as DEFT has rounds, with the same learning-rate schedule. Prints one JSON
object: both summaries and the dev-accuracy difference (DEFT - baseline, in points).

    python experiments/deft_sst2.py --glue /work/shared/data/glue --rounds 300 --devices 4 \
        --out /tmp/deft_sst2            # add --fleet experiments/fleets/edge4.yaml for the allocation
    python experiments/deft_sst2.py --which baseline ...   # one side only (run both in parallel)

The GLUE folder is read in place; nothing is copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glue", default="/work/shared/data/glue")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--adapter", default="houlsby")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=None, help="depth blocks (default: min(devices, layers))")
    ap.add_argument("--fleet", default=None, help="fleet file: optimal allocation (default: round-robin)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--which", choices=["both", "deft", "baseline"], default="both")
    ap.add_argument("--out", default="/tmp/deft_sst2")
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={max(args.devices, 1)}")

    from ringjax.methods.deft import train_deft
    from ringjax.train.config import TrainConfig
    from ringjax.train.trainer import prepare, train_single_device

    out = Path(args.out)
    common = dict(model=args.model, task="sst2", data_dir=args.glue, steps=args.rounds, batch_size=args.batch_size,
                  max_length=args.max_length, eval_every=args.eval_every, seed=args.seed, progress=False)
    result = {"rounds": args.rounds, "batch_size": args.batch_size}
    if args.which in ("both", "deft"):
        config = TrainConfig(method="deft", adapter=args.adapter, devices=args.devices, blocks=args.blocks,
                             fleet=args.fleet, out=str(out / "deft"), **common)
        result["deft"] = train_deft(prepare(config), args.fleet, args.blocks)
    if args.which in ("both", "baseline"):
        config = TrainConfig(method=args.adapter, out=str(out / "baseline"), **common)
        result["baseline"] = train_single_device(prepare(config))
    if "deft" in result and "baseline" in result:
        result["difference_points"] = 100 * (result["deft"]["dev_metric"] - result["baseline"]["dev_metric"])
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
