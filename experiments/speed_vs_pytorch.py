"""ringjax vs PyTorch (+PEFT) training-step time on all-MiniLM-L6-v2, measured side by side.

The two programs alternate, ROUNDS times per method, so drift on a shared machine hits both.
The PyTorch side runs ../shared/bench/peer_step.py in its own virtual environment (see
../shared/bench/README.md); pass that environment's python with --peer-python.

usage: python experiments/speed_vs_pytorch.py --peer-python /tmp/peer-venv/bin/python [--rounds 3]
Prints one JSON object: per ringjax variant, both medians and their ratio, plus ringjax's MFU.

Variants: lora, houlsby and full in float32, and each with `--compute-dtype bfloat16` (block
projections multiplied in bf16: frozen kernels stored in bf16, full fine-tuning's float32 master
kernels narrowed in the step; everything else float32). Every variant is compared
with the float32 PyTorch step the issue names (LoRA for the PEFT methods, full for full); the
bf16 variants also with the same PyTorch step under `torch.autocast("cpu", torch.bfloat16)`, the
mixed precision PyTorch itself offers, so neither side's precision is hidden.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# name -> (ringjax method, compute dtype, PyTorch reference step)
VARIANTS = {
    "lora": ("lora", "float32", "lora"),
    "houlsby": ("houlsby", "float32", "lora"),
    "full": ("full", "float32", "full"),
    "lora-bf16": ("lora", "bfloat16", "lora"),
    "houlsby-bf16": ("houlsby", "bfloat16", "lora"),
    "full-bf16": ("full", "bfloat16", "full"),
}
AUTOCAST = ("import runpy, sys, torch; script = sys.argv[1]; sys.argv = sys.argv[1:]\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16): runpy.run_path(script, run_name='__main__')")


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True)
    parser.add_argument("--peer-script", default=str(Path(__file__).resolve().parents[2] / "shared/bench/peer_step.py"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    names = [name for name in args.variants.split(",") if name]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    chosen = {name: VARIANTS[name] for name in names}
    ours = {name: [] for name in chosen}
    mfu = {name: [] for name in chosen}
    peer = {}  # (reference, "float32" | "bf16-autocast") -> seconds
    shape = [str(args.batch), str(args.seq)]
    for _ in range(args.rounds):
        for name, (method, dtype, reference) in chosen.items():
            r = run_json([sys.executable, "-m", "ringjax.cli.main", "bench", "step", "--method", method,
                          "--compute-dtype", dtype, "--batch", shape[0], "--seq", shape[1], "--json"])
            ours[name].append(r["seconds_per_step"])
            mfu[name].append(r["mfu"])
            peer_runs = [("float32", [args.peer_python, args.peer_script, reference, *shape])]
            if dtype == "bfloat16":
                peer_runs.append(("bf16-autocast", [args.peer_python, "-c", AUTOCAST, args.peer_script, reference, *shape]))
            for precision, cmd in peer_runs:
                peer.setdefault((reference, precision), []).append(run_json(cmd)["seconds_per_step"])
    result = {}
    for name, (method, dtype, reference) in chosen.items():
        a = statistics.median(ours[name])
        row = {"ringjax_seconds": a, "compute_dtype": dtype, "mfu": statistics.median(mfu[name]), "rounds": args.rounds}
        for precision in ("float32", "bf16-autocast") if dtype == "bfloat16" else ("float32",):
            b = statistics.median(peer[(reference, precision)])
            row[f"pytorch_{reference}_{precision}_seconds"] = b
            row[f"ratio_vs_pytorch_{precision}"] = a / b
        result[name] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
