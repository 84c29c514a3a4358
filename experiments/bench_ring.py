"""Ring step vs single-device step on one machine: prints the JSON of `ringjax.parallel.bench.bench_ring`.

usage: python experiments/bench_ring.py [--model minilm] [--devices 4] [--microbatches 8] [--batch 32]
       [--seq 64] [--depths 1,3,6] [--schedule gpipe|1f1b] [--residuals keep|recompute] [--stages equal|balanced|2,2,1,1]
Emulated CPU devices are created here (XLA_FLAGS is set before jax is imported).
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--depths", default="1,3,6")
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--residuals", default="keep")
    p.add_argument("--stages", default="equal")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}").strip()
    from ringjax.parallel.bench import bench_ring

    result = bench_ring(args.model, args.devices, args.microbatches, args.batch, args.seq,
                        tuple(int(x) for x in args.depths.split(",")), schedule=args.schedule,
                        residuals=args.residuals, stages=args.stages, repeats=args.repeats)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
