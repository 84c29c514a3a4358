"""PAC on SST-2 with MiniLM over emulated devices, next to full fine-tuning and Houlsby adapters.

Measures, in one process (so the shared machine's load hits every method alike):
1. PAC epoch seconds (epoch 1: ring-pipelined backbone forward that trains the side network
   and fills the activation cache; epochs >= 2: cache only, data parallel): epoch2 / epoch1;
2. training-step peak bytes from XLA's memory analysis (temp + argument + output) of PAC's
   cached step against full fine-tuning's and Houlsby's `make_train_step`, at batch x max_length;
3. dev accuracy after E epochs and whole-run seconds, PAC (N devices) against single-device
   Houlsby adapters trained the same epochs on the same examples and batches.

    python experiments/pac_sst2.py --glue /work/shared/data/glue --train-examples 8000 \
        --devices 4 --epochs 3 --cache-dir /tmp/pac_cache --out runs/pac_sst2.json

The GLUE folder is read in place; nothing is copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glue", default="/work/shared/data/glue")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--train-examples", type=int, default=8000, help="random subset of train (0: all)")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=2,
                    help="epoch 1's ring pipeline microbatches (on 2 shared CPU cores fewer, larger ones win)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="PAC learning rate")
    ap.add_argument("--houlsby-lr", type=float, default=1e-3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache-dir", default="/tmp/pac_cache")
    ap.add_argument("--fresh-cache", action="store_true", help="delete this run's cache entries first")
    ap.add_argument("--baselines", default="houlsby", help="comma list of presets to train (houlsby, full)")
    ap.add_argument("--baseline-epochs", type=int, default=None, help="train baselines this many epochs (default --epochs)")
    ap.add_argument("--skip-pac", action="store_true", help="only the baselines (and the memory comparison)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # Emulated devices; generous collective timeouts, because on an oversubscribed shared CPU a
    # device thread can miss XLA's default 40 s rendezvous deadline, which aborts the process.
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={max(args.devices, 1)}",
        "--xla_cpu_collective_call_terminate_timeout_seconds=3600",
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600",
        "--xla_cpu_collective_timeout_seconds=3600",
    ])

    from ringjax.runtime import reuse_freed_memory

    reuse_freed_memory()  # as the `ringjax` command line does: only under RINGJAX_MALLOC=reuse (ringjax/runtime.py)

    import jax
    import numpy as np

    import ringjax
    from ringjax.data import encode, load_task_data
    from ringjax.methods import activation_cache as ac
    from ringjax.methods import pac
    from ringjax.peft import preset
    from ringjax.train.optim import OptimConfig, make_optimizer

    def log(record):
        print(json.dumps(record), flush=True)

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1, default=str)

    t0 = time.perf_counter()
    model = ringjax.load_model(args.model, head="classification", peft="parallel", seed=args.seed)
    cfg, head, spec = model.config, model.head_config, model.peft_config
    tokenizer = ringjax.load_tokenizer(model.directory)
    limit = args.train_examples or None
    train = encode(load_task_data(args.task, args.glue, "train", limit, args.seed), tokenizer, args.max_length,
                   cfg.max_length)
    dev = encode(load_task_data(args.task, args.glue, "dev"), tokenizer, args.max_length, cfg.max_length)
    identity = {"model": ac.model_identity(model.directory), "tokenizer": ac.tokenizer_identity(model.directory)}
    params = model.tree()
    base = {k: params[k] for k in ("embed", "blocks", "final")}
    steps = len(train) // args.batch_size
    out = {
        "task": args.task, "model": args.model, "train_examples": len(train), "dev_examples": len(dev),
        "train_tokens": int(train.offsets[-1]), "devices": args.devices, "epochs": args.epochs,
        "batch_size": args.batch_size, "max_length": args.max_length, "cache_dtype": args.dtype,
        "machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
        "setup_seconds": time.perf_counter() - t0,
    }
    if args.fresh_cache:
        import shutil

        for entry in ac.list_entries(args.cache_dir) if os.path.isdir(args.cache_dir) else []:
            shutil.rmtree(entry["path"], ignore_errors=True)

    # --- PAC
    optimizer = make_optimizer(OptimConfig(lr=args.lr), args.epochs * steps)
    result = None if args.skip_pac else pac.train_pac(
        cfg, spec, head, params, train, dev, args.devices, args.epochs, args.batch_size, optimizer, args.cache_dir,
        args.dtype, seed=args.seed, identity=identity, log=log, microbatches=args.microbatches)
    if result is not None:
        s = result.summary
        out["pac"] = {k: v for k, v in s.items()}
        out["pac"]["total_seconds"] = float(sum(s["epoch_seconds"]))
        out["pac"]["total_cpu_seconds"] = float(sum(s["epoch_cpu_seconds"]))
        print(json.dumps({"pac_done": out["pac"]["epoch_seconds"], "cache_bytes": s["cache_bytes"]}), flush=True)
        save()

    # --- memory: PAC's cached step vs the baselines' steps, same batch x tokens
    mem = {"tokens": [args.batch_size, args.max_length]}
    mem["pac"] = pac.step_memory("pac", cfg, head, params, optimizer, args.batch_size, args.max_length, spec,
                                 args.dtype)
    if args.devices > 1:
        mesh = pac.data_mesh(jax.devices()[: args.devices])
        mem["pac_data_parallel_per_device"] = pac.step_memory(
            "pac", cfg, head, params, optimizer, args.batch_size, args.max_length, spec, args.dtype, mesh)
    for name in ("full", "houlsby"):
        bspec = preset(name)
        bparams = ringjax.models.assemble(cfg, base, head, bspec, jax.random.key(args.seed))
        mem[name] = pac.step_memory(name, cfg, head, bparams, optimizer, args.batch_size, args.max_length, bspec)
    mem["pac_over_full"] = mem["pac"]["peak_bytes"] / mem["full"]["peak_bytes"]
    mem["pac_over_houlsby"] = mem["pac"]["peak_bytes"] / mem["houlsby"]["peak_bytes"]
    out["memory"] = mem
    log({"memory": mem})
    save()

    # --- baselines, single device, same data, batches and epochs
    out["baselines"] = {}
    for name in [b for b in args.baselines.split(",") if b]:
        bspec = preset(name)
        bparams = ringjax.models.assemble(cfg, base, head, bspec, jax.random.key(args.seed))
        lr = args.houlsby_lr if name == "houlsby" else 5e-5
        b_epochs = args.baseline_epochs or args.epochs
        boptim = make_optimizer(OptimConfig(lr=lr), args.epochs * steps)
        out["baselines"][name] = pac.train_baseline(cfg, bspec, head, bparams, train, dev, b_epochs, args.batch_size,
                                                    boptim, seed=args.seed, log=log)
        out["baselines"][name]["lr"] = lr
        save()

    # --- the figures
    out["figures"] = figures(out, args.epochs)
    log({"figures": out["figures"]})
    out["machine"]["load_at_end"] = os.getloadavg()
    save()
    return out


def figures(out: dict, epochs: int) -> dict:
    """The issue's four figures from one run's (or merged runs') results."""
    fig = {}
    pac = out.get("pac")
    if pac:
        secs, cpu = pac["epoch_seconds"], pac["epoch_cpu_seconds"]
        fig |= {"epoch2_over_epoch1": secs[1] / secs[0] if len(secs) > 1 else None,
                "epoch2_over_epoch1_cpu": cpu[1] / cpu[0] if len(cpu) > 1 else None,
                "pac_dev_accuracy": pac["dev"]["accuracy"], "cache_bytes": pac["cache_bytes"]}
    mem = out.get("memory")
    if mem:
        fig["peak_bytes_pac_over_full"] = mem["pac_over_full"]
    hou = out.get("baselines", {}).get("houlsby")
    if hou and pac:
        complete = len(hou["epoch_seconds"]) == epochs
        fig["houlsby_dev_accuracy"] = hou["dev"]["accuracy"] if complete else None
        if complete:
            fig["accuracy_gap_points"] = 100 * (fig["houlsby_dev_accuracy"] - fig["pac_dev_accuracy"])
        for unit, key, total in (("", "epoch_seconds", "total_seconds"), ("_cpu", "epoch_cpu_seconds", "total_cpu_seconds")):
            hou_run = sum(hou[key]) / len(hou[key]) * epochs
            fig[f"houlsby_run_seconds{unit}"] = hou_run
            fig[f"pac_run_seconds{unit}"] = pac[total]
            fig[f"speedup_whole_run{unit}"] = hou_run / pac[total]
    return fig


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
