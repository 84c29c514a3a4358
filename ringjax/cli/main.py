"""The `ringjax` command line. User errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ringjax.errors import RingjaxError
from ringjax.train.config import add_config_flags, config_from_args


def cmd_train(args) -> int:
    from ringjax.methods import run_method

    config = config_from_args(args)
    summary = run_method(config)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}))
    return 0


def cmd_eval(args) -> int:
    from ringjax.train.saved import evaluate_saved

    print(json.dumps(evaluate_saved(args.run)))
    return 0


def cmd_export(args) -> int:
    from ringjax.train.saved import export_saved

    print(json.dumps({"written": [str(p) for p in export_saved(args.run, args.to, args.format)]}))
    return 0


def cmd_bench(args) -> int:
    from ringjax.bench import run_bench

    result = run_bench(args.what, vars(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model (any method)")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a finished or checkpointed run on its dev set")
    ev.add_argument("--run", required=True, help="the --out directory of a training run")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a run's trainable parameters (safetensors + JSON)")
    ex.add_argument("--run", required=True, help="the --out directory of a training run")
    ex.add_argument("--to", required=True, help="directory to write")
    ex.add_argument("--format", choices=["ringjax", "hf-peft"], default="ringjax",
                    help="hf-peft: Hugging Face PEFT layout (LoRA only)")
    ex.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="measure a step; prints JSON")
    bench.add_argument("what", choices=["step"])
    bench.add_argument("--model", default="minilm")
    bench.add_argument("--method", default="houlsby")
    bench.add_argument("--batch", type=int, default=32)
    bench.add_argument("--seq", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    from ringjax.plan import cli as plan_cli

    plan = sub.add_parser("plan", help="placement (ringada, pac), allocation (deft) or layer selection (caff) for a fleet")
    plan_cli.add_plan_arguments(plan)
    plan.set_defaults(func=plan_cli.cmd_plan)

    calibrate = sub.add_parser("calibrate", help="measure this machine (matmul FLOP/s, memory) and write a profile")
    plan_cli.add_calibrate_arguments(calibrate)
    calibrate.set_defaults(func=plan_cli.cmd_calibrate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RingjaxError as e:
        print(f"ringjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ringjax: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
