"""CAFF vs its baselines on SST-2 with MiniLM: 100 clients, 10 per round, Dirichlet(0.5), three tiers.

    python experiments/caff_sst2.py --data-dir ../shared/data/glue --rounds 25 --out /tmp/caff_runs

The fleet (budgets per round for B=16, T=64, E=5 local steps, from ringjax.fl.costs):
- weak (40%): 250MB, 2e11 FLOPs, 12MB upload -> only the top block (upload binds at t=2;
  LoRA in all blocks needs every block's activations and does not fit 250MB);
- medium (40%): 500MB, 2.4e11 FLOPs, 25MB -> top 3 blocks (FLOPs and upload bind), LoRA fits;
- strong (20%): 1GB, 4e11 FLOPs, 100MB -> everything, full fine-tuning included.
Each method writes OUT/<method>.json (skipped when present, so the script resumes); then
`--plot docs/caff_curves.png` draws dev accuracy per round and cumulative upload.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FLEET = {
    "tiers": [
        {"name": "weak", "fraction": 0.4, "memory": "250MB", "flops_per_round": 2.0e11, "upload": "12MB"},
        {"name": "medium", "fraction": 0.4, "memory": "500MB", "flops_per_round": 2.4e11, "upload": "25MB"},
        {"name": "strong", "fraction": 0.2, "memory": "1GB", "flops_per_round": 4.0e11, "upload": "100MB"},
    ]
}
METHODS = ("caff", "uniform-t", "fedlora", "fedavg-full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--out", default="/tmp/caff_runs")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write the curves PNG here (after the runs)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [m for m in args.methods.split(",") if m and not (out / f"{m}.json").exists()]
    if todo:
        run_methods(args, out, todo)
    if args.plot:
        plot(out, [m for m in args.methods.split(",") if (out / f"{m}.json").exists()], args.plot)


def run_methods(args, out: Path, methods: list[str]) -> None:
    import ringjax
    from ringjax.data import encode, load_task_data
    from ringjax.fl import FLConfig, parse_fleet, run_federated
    from ringjax.fl.costs import CostModel
    from ringjax.methods.caff import tier_depths

    model = ringjax.load_model("minilm", head="classification", peft="top-t", seed=args.seed)
    tokenizer = ringjax.load_tokenizer(model.directory)
    t0 = time.perf_counter()
    train = encode(load_task_data("sst2", args.data_dir, "train"), tokenizer, args.max_length)
    dev = encode(load_task_data("sst2", args.data_dir, "dev"), tokenizer, args.max_length)
    print(f"encoded {len(train)} train / {len(dev)} dev examples in {time.perf_counter() - t0:.1f}s", flush=True)
    config = FLConfig(
        num_clients=args.clients, per_round=args.per_round, rounds=args.rounds, local_steps=args.local_steps,
        batch_size=args.batch_size, max_length=args.max_length, alpha=args.alpha, seed=args.seed, lr=args.lr,
        lora_lr=args.lora_lr, eval_every=args.eval_every,
    )
    costs = CostModel(model.config, model.head_config, config.workload)
    for name, c in costs.table():
        print(f"cost {name:7s} memory {c.memory_bytes / 1e6:7.1f} MB  flops/round {c.flops_per_round / 1e9:7.1f} G  upload {c.upload_bytes / 1e6:6.2f} MB")
    budgets = parse_fleet(FLEET, "experiments/caff_sst2.py fleet").assign(config.num_clients, config.seed)
    params = model.tree()
    for method in methods:
        start = time.perf_counter()
        run = run_federated(method, model.config, model.head_config, params, train, budgets, config, dev, "sst2", log=lambda s: print(s, flush=True))
        record = run.to_json()
        record["tier_depths"] = tier_depths(run, budgets)
        record["budgets"] = FLEET
        record["config"] = {k: v for k, v in vars(args).items()}
        record["wall_seconds"] = time.perf_counter() - start
        (out / f"{method}.json").write_text(json.dumps(record, indent=1))
        print(f"{method}: final dev accuracy {run.rounds[-1].dev_metric}, uploaded {run.rounds[-1].total_bytes_uploaded / 1e6:.1f} MB, "
              f"{record['wall_seconds']:.0f}s, measured peaks {run.measured_peak_bytes}", flush=True)


def plot(out: Path, methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        rec = json.loads((out / f"{method}.json").read_text())
        rounds = [r for r in rec["rounds"] if r["dev_metric"] is not None]
        label = f"{method} ({rec['plan'].split(':')[1].split(' take part')[0].strip()} clients)"
        acc_ax.plot([r["round"] for r in rounds], [100 * r["dev_metric"] for r in rounds], marker="o", ms=3, label=label)
        bytes_ax.plot([r["total_bytes_uploaded"] / 1e9 for r in rounds], [100 * r["dev_metric"] for r in rounds], marker="o", ms=3, label=method)
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("SST-2 dev accuracy (%)")
    acc_ax.set_title("MiniLM, 100 clients, 10 per round, Dirichlet 0.5")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    bytes_ax.set_xlabel("cumulative upload (GB)")
    bytes_ax.set_ylabel("SST-2 dev accuracy (%)")
    bytes_ax.set_xscale("log")
    bytes_ax.set_title("accuracy vs bytes uploaded")
    bytes_ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
