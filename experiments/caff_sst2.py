"""CAFF vs its baselines on SST-2 with MiniLM: 100 clients, 10 per round, Dirichlet(0.5), three tiers.

    python experiments/caff_sst2.py --data-dir ../shared/data/glue --rounds 25 --out /tmp/caff_runs

The fleet is experiments/fleets/caff_tiers3.yaml (budgets per round for B=16, T=64, E=5 local
steps, from ringjax.fl.costs):
- weak (40%): 250MB, 2e11 FLOPs, 12MB upload -> only the top block (upload binds at t=2;
  LoRA in all blocks needs every block's activations and does not fit 250MB);
- medium (40%): 500MB, 2.4e11 FLOPs, 25MB -> top 3 blocks (FLOPs and upload bind), LoRA fits;
- strong (20%): 1GB, 4e11 FLOPs, 100MB -> everything, full fine-tuning included.
All four methods (caff, uniform-t, fedlora, fedavg-full) start from the same pretrained weights
and use the same seed, the same client budgets and the same Dirichlet partition of the training
set (computed once and handed to each). Each method writes OUT/<method>.json (skipped when
present with the same settings, so the script resumes); then the curves (dev accuracy per round,
and against cumulative upload) go to --plot (default docs/caff_sst2_curves.png) and the per-round
dev metric and cumulative bytes of every method to --curves (default: the plot path with .json).

A short check: --rounds 2 --max-train-examples 2000 (or --model DIR for a tiny local model).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import yaml

FLEET_FILE = Path(__file__).parent / "fleets" / "caff_tiers3.yaml"
FLEET = yaml.safe_load(FLEET_FILE.read_text())  # also read by caff_timing.py
METHODS = ("caff", "uniform-t", "fedlora", "fedavg-full")
# settings a finished OUT/<method>.json must share with this invocation to be reused
RUN_KEYS = ("model", "data_dir", "fleet", "clients", "per_round", "rounds", "local_steps", "batch_size", "max_length",
            "alpha", "pooling", "lr", "lora_lr", "server_momentum", "server_lr", "server_ema", "logit_adjust", "sampling", "eval_every", "seed", "max_train_examples", "max_eval_examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--out", default="/tmp/caff_runs")
    parser.add_argument("--model", default="minilm", help="model name or local directory")
    parser.add_argument("--fleet", default=str(FLEET_FILE), help="budget-tier fleet file")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew; 0: IID")
    parser.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                        help="classifier input: the [CLS] state through BERT's pooler, or the mean over real tokens (MiniLM's own pooling)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM server momentum for every method (0: plain averaging)")
    parser.add_argument("--server-lr", type=float, default=1.0, help="server step along each round's averaged change, every method (1: plain averaging)")
    parser.add_argument("--server-ema", type=float, default=0.0,
                        help="evaluate a moving average of the server models with this decay, every method (0: the latest)")
    parser.add_argument("--logit-adjust", type=float, default=0.0,
                        help="clients train on logits + TAU x log(their label prior), every method (0: plain cross-entropy)")
    parser.add_argument("--sampling", choices=("eligible", "all"), default="eligible",
                        help="eligible: each round draws among the clients that afford the method's job; all: draws among all, the rest sit out")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-examples", type=int, default=None, help="a seeded subset of the training set (short runs)")
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--plot", default="docs/caff_sst2_curves.png", help="the curves PNG ('' to skip)")
    parser.add_argument("--curves", default=None, help="per-round dev metric and cumulative bytes as JSON (default: --plot with .json)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    settings = {k: getattr(args, k) for k in RUN_KEYS}
    todo = [m for m in methods if not reusable(out / f"{m}.json", settings)]
    if todo:
        run_methods(args, out, todo, settings)
    curves = collect(out, methods)
    curves_path = args.curves or (str(Path(args.plot).with_suffix(".json")) if args.plot else None)
    if curves_path:
        Path(curves_path).parent.mkdir(parents=True, exist_ok=True)
        Path(curves_path).write_text(json.dumps(curves, indent=1))
        print(f"wrote {curves_path}")
    if args.plot:
        plot(curves, args.plot)
    clients = (curves["settings"] or {}).get("clients", "?")
    for m, c in curves["methods"].items():
        print(f"{m:12s} final dev {c['metric']} {c['final_dev_metric']}  uploaded {c['total_bytes_uploaded'] / 1e9:.3f} GB  "
              f"{c['participating']}/{clients} clients take part")


def reusable(path: Path, settings: dict) -> bool:
    if not path.exists():
        return False
    saved = json.loads(path.read_text()).get("settings")
    if saved is not None:
        saved.setdefault("sampling", "eligible")  # runs saved before --sampling existed drew among the eligible
    if saved != settings:
        print(f"{path}: settings differ from this run's; running again")
        return False
    return True


def run_methods(args, out: Path, methods: list[str], settings: dict) -> None:
    import ringjax
    from ringjax.data import encode, load_task_data, partition
    from ringjax.fl import FLConfig, load_fleet, run_federated
    from ringjax.fl.costs import CostModel
    from ringjax.methods.caff import tier_depths

    head = ringjax.HeadConfig("classification", pooling=args.pooling)
    model = ringjax.load_model(args.model, head=head, peft="top-t", seed=args.seed)
    tokenizer = ringjax.load_tokenizer(model.directory)
    t0 = time.perf_counter()
    train = encode(load_task_data("sst2", args.data_dir, "train", args.max_train_examples, args.seed), tokenizer, args.max_length)
    dev = encode(load_task_data("sst2", args.data_dir, "dev", args.max_eval_examples, args.seed), tokenizer, args.max_length)
    print(f"encoded {len(train)} train / {len(dev)} dev examples in {time.perf_counter() - t0:.1f}s", flush=True)
    config = FLConfig(
        num_clients=args.clients, per_round=args.per_round, rounds=args.rounds, local_steps=args.local_steps,
        batch_size=args.batch_size, max_length=args.max_length, alpha=args.alpha or None, seed=args.seed, lr=args.lr,
        lora_lr=args.lora_lr, eval_every=args.eval_every, server_momentum=args.server_momentum, server_lr=args.server_lr, server_ema=args.server_ema, logit_adjust=args.logit_adjust,
        sampling=args.sampling,
    )
    costs = CostModel(model.config, model.head_config, config.workload)
    for name, c in costs.table():
        print(f"cost {name:7s} memory {c.memory_bytes / 1e6:7.1f} MB  flops/round {c.flops_per_round / 1e9:7.1f} G  upload {c.upload_bytes / 1e6:6.2f} MB")
    budgets = load_fleet(args.fleet).assign(config.num_clients, config.seed)
    # one partition for every method: the same clients hold the same examples throughout
    parts = partition(train.labels, config.num_clients, config.alpha, config.seed)
    params = model.tree()
    for method in methods:
        start = time.perf_counter()
        run = run_federated(method, model.config, model.head_config, params, train, budgets, config, dev, "sst2",
                            log=lambda s: print(s, flush=True), partitions=parts)
        record = run.to_json()
        record["tier_depths"] = tier_depths(run, budgets)
        record["budgets"] = yaml.safe_load(Path(args.fleet).read_text())
        record["settings"] = settings
        record["participating"] = len(run.plan.eligible)
        record["wall_seconds"] = time.perf_counter() - start
        (out / f"{method}.json").write_text(json.dumps(record, indent=1))
        print(f"{method}: final dev accuracy {run.rounds[-1].dev_metric}, uploaded {run.rounds[-1].total_bytes_uploaded / 1e6:.1f} MB, "
              f"{record['wall_seconds']:.0f}s, measured peaks {run.measured_peak_bytes}", flush=True)


def collect(out: Path, methods: list[str]) -> dict:
    """Per method: the evaluated rounds' dev metric and cumulative upload, and the totals."""
    curves: dict = {"settings": None, "methods": {}}
    for method in methods:
        rec = json.loads((out / f"{method}.json").read_text())
        curves["settings"] = curves["settings"] or rec.get("settings")
        rounds = [r for r in rec["rounds"] if r["dev_metric"] is not None]
        curves["methods"][method] = {
            "metric": rec["metric"],
            "plan": rec["plan"],
            "participating": rec.get("participating", int(re.search(r": (\d+)/", rec["plan"]).group(1))),
            "excluded": rec["excluded_clients"],
            "tier_depths": rec.get("tier_depths"),
            "round": [r["round"] for r in rounds],
            "dev_metric": [r["dev_metric"] for r in rounds],
            "cumulative_bytes_uploaded": [r["total_bytes_uploaded"] for r in rounds],
            "final_dev_metric": rounds[-1]["dev_metric"] if rounds else None,
            "total_bytes_uploaded": rec["rounds"][-1]["total_bytes_uploaded"] if rec["rounds"] else 0,
            "measured_peak_bytes": rec["measured_peak_bytes"],
            "wall_seconds": rec.get("wall_seconds"),
        }
    return curves


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = curves["settings"] or {}
    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, c in curves["methods"].items():
        acc = [100 * v for v in c["dev_metric"]]
        label = f"{method} ({c['participating']} of {s.get('clients', '?')} clients)"
        acc_ax.plot(c["round"], acc, marker="o", ms=3, label=label)
        bytes_ax.plot([b / 1e9 for b in c["cumulative_bytes_uploaded"]], acc, marker="o", ms=3, label=method)
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("SST-2 dev accuracy (%)")
    drawn = " drawn (the rest sit out)" if s.get("sampling") == "all" else ""
    first = (f"{Path(str(s.get('model', '?'))).name}, {s.get('clients', '?')} clients, {s.get('per_round', '?')}{drawn} per round, "
             f"Dirichlet {s.get('alpha', '?')}")
    options = [f"{s['pooling']} pooling" if s.get("pooling") else "",
               f"server momentum {s['server_momentum']}" if s.get("server_momentum") else "",
               f"server lr {s['server_lr']}" if s.get("server_lr", 1.0) != 1.0 else "",
               f"logit adjust {s['logit_adjust']}" if s.get("logit_adjust") else "",
               f"server EMA {s['server_ema']}" if s.get("server_ema") else ""]
    acc_ax.set_title("\n".join(filter(None, [first, ", ".join(filter(None, options))])), fontsize=10)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    bytes_ax.set_xlabel("cumulative upload (GB)")
    bytes_ax.set_ylabel("SST-2 dev accuracy (%)")
    bytes_ax.set_xscale("log")
    bytes_ax.set_title("accuracy vs bytes uploaded", fontsize=10)
    bytes_ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
