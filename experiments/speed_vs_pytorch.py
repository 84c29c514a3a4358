"""ringjax vs PyTorch (+PEFT) training-step time on all-MiniLM-L6-v2, measured side by side.

The two programs alternate, ROUNDS times per method, so drift on a shared machine hits both.
The PyTorch side runs ../shared/bench/peer_step.py in its own virtual environment (see
../shared/bench/README.md); pass that environment's python with --peer-python.

usage: python experiments/speed_vs_pytorch.py --peer-python /tmp/peer-venv/bin/python [--rounds 3]
Prints one JSON object: per method, both medians and their ratio, plus ringjax's MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PAIRS = {"lora": "lora", "houlsby": "lora", "full": "full"}  # ringjax method -> PyTorch reference


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
    args = parser.parse_args()
    ours = {m: [] for m in PAIRS}
    peer = {m: [] for m in set(PAIRS.values())}
    mfu = {m: [] for m in PAIRS}
    for _ in range(args.rounds):
        for method, reference in PAIRS.items():
            r = run_json([sys.executable, "-m", "ringjax.cli.main", "bench", "step", "--method", method,
                          "--batch", str(args.batch), "--seq", str(args.seq), "--json"])
            ours[method].append(r["seconds_per_step"])
            mfu[method].append(r["mfu"])
            p = run_json([args.peer_python, args.peer_script, reference, str(args.batch), str(args.seq)])
            peer[reference].append(p["seconds_per_step"])
    result = {}
    for method, reference in PAIRS.items():
        a, b = statistics.median(ours[method]), statistics.median(peer[reference])
        result[method] = {"ringjax_seconds": a, f"pytorch_{reference}_seconds": b, "ratio": a / b,
                          "mfu": statistics.median(mfu[method]), "rounds": args.rounds}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
