"""Side-network design study from an existing PAC cache: no backbone compute at all.

Variants that read the same taps share one cache (built by `experiments/pac_sst2.py` with the
same data arguments, or by the first variant that needs it), so a variant costs little more than
side-network training. Prints dev accuracy and seconds per epoch (one device).

    python experiments/pac_side_variants.py --train-examples 8000 --cache-dir /tmp/pac_cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glue", default="/work/shared/data/glue")
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache-dir", default="/tmp/pac_cache")
    ap.add_argument("--variants", default="base,base-lr1e-3,every1,every1-lr3e-3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax

    import ringjax
    from ringjax.data import encode, load_task_data
    from ringjax.methods import activation_cache as ac
    from ringjax.methods import pac
    from ringjax.peft import parallel
    from ringjax.peft.config import PeftConfig
    from ringjax.train.optim import OptimConfig, make_optimizer

    # name: (PeftConfig side-network fields, learning rate); "base" is the `parallel` preset
    variants = {
        "base": (dict(), 3e-3),
        "base-lr1e-3": (dict(), 1e-3),
        "every1": (dict(side_every=1), 1e-3),
        "every1-lr3e-3": (dict(side_every=1), 3e-3),
        "noattn": (dict(side_attention=False), 3e-3),
        "heads1": (dict(side_heads=1), 3e-3),
        "wide": (dict(side_reduction=4), 3e-3),
        "top3": (dict(side_taps=(4, 5, 6)), 3e-3),
    }
    model = ringjax.load_model("minilm", head="classification", peft="parallel", seed=args.seed)
    cfg, head = model.config, model.head_config
    tok = ringjax.load_tokenizer(model.directory)
    limit = args.train_examples or None
    train = encode(load_task_data("sst2", args.glue, "train", limit, args.seed), tok, args.max_length, cfg.max_length)
    dev = encode(load_task_data("sst2", args.glue, "dev"), tok, args.max_length, cfg.max_length)
    identity = {"model": ac.model_identity(model.directory), "tokenizer": ac.tokenizer_identity(model.directory)}
    steps = len(train) // args.batch_size
    results = {}
    for name in args.variants.split(","):
        changes, lr = variants[name]
        spec = PeftConfig(kind="parallel", **changes)
        params = model.tree()
        params["peft"] = {"side": parallel.init_side_for(spec, jax.random.key(args.seed), cfg.hidden_size, cfg.num_layers)}
        optimizer = make_optimizer(OptimConfig(lr=lr), args.epochs * steps)
        r = pac.train_pac(cfg, spec, head, params, train, dev, 1, args.epochs, args.batch_size, optimizer,
                          args.cache_dir, args.dtype, seed=args.seed, identity=identity)
        if not r.summary["cache_hit"]:
            print(f"warning: {name} rebuilt the cache (run pac_sst2.py with the same data arguments first)")
        results[name] = {"lr": lr, **changes, "dev_accuracy": [e["dev"]["accuracy"] for e in r.summary["epochs"]],
                         "epoch_seconds": r.summary["epoch_seconds"]}
        print(json.dumps({name: results[name]}, default=str), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    sys.exit(0 if main() else 1)
