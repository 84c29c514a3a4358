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
    _host_devices(config.devices)
    summary = run_method(config)
    if _primary():  # in a multi-process run (`ringjax launch`), process 0 speaks for the run
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}))
    return 0


def _host_devices(n) -> None:
    """Make `--devices N` emulated CPU devices before JAX starts its backends, unless XLA_FLAGS
    (--xla_force_host_platform_device_count) or a multi-process launch already decides."""
    from ringjax.parallel.mesh import ensure_host_devices

    ensure_host_devices(int(n or 1))


def _primary() -> bool:
    from ringjax.parallel.mesh import is_primary

    return is_primary()


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

    if args.what != "step":  # multi-device benchmarks: emulate --devices CPU devices unless XLA_FLAGS decide
        _host_devices(getattr(args, "devices", None))
    result = run_bench(args.what, vars(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_launch(args) -> int:
    from ringjax.parallel.launch import main_launch

    argv = list(args.argv)
    return main_launch(args.processes, argv[1:] if argv[:1] == ["--"] else argv)


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

    from ringjax.bench import BENCHMARKS

    bench = sub.add_parser("bench", help="measure a step; prints JSON")
    bench.add_argument("what", choices=sorted(BENCHMARKS), help="step: one training step; pac: PAC vs full and Houlsby; "
                       "ring: the RingAda ring step per unfreeze depth vs the single-device step")
    bench.add_argument("--model", default="minilm")
    bench.add_argument("--method", default="houlsby")
    bench.add_argument("--batch", type=int, default=32)
    bench.add_argument("--seq", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                       help="step: bfloat16 multiplies the block projections in bf16 (adapter, LoRA, full, top-t)")
    # bench pac (its --seq is the max length, its --batch the global batch)
    bench.add_argument("--devices", type=int, default=4, help="pac: emulated or real devices (default 4)")
    bench.add_argument("--epochs", type=int, default=2, help="pac: epochs of PAC (default 2)")
    bench.add_argument("--baseline-epochs", type=int, default=None, help="pac: epochs of the baselines (default --epochs)")
    bench.add_argument("--baselines", default="full,houlsby", help="pac: comma list of presets to compare")
    bench.add_argument("--task", default="synthetic", help="pac: task (GLUE tasks need --data-dir)")
    bench.add_argument("--data-dir", default=None)
    bench.add_argument("--train-examples", type=int, default=1024, help="pac: train examples")
    bench.add_argument("--dev-examples", type=int, default=256, help="pac: dev examples")
    bench.add_argument("--cache-dtype", default="bfloat16", help="pac: float32 | bfloat16 | float16")
    # bench ring (its --devices, --batch, --seq, --method (the adapter) and --repeats are shared)
    bench.add_argument("--microbatches", type=int, default=8, help="ring: microbatches per step (default 8)")
    bench.add_argument("--depths", default=None, help="ring: unfreeze depths, e.g. 1,3,6 (default: 1, middle, all)")
    bench.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b", help="ring: pipeline schedule")
    bench.add_argument("--residuals", choices=["keep", "recompute"], default="keep",
                       help="ring: keep forward residuals or recompute them in the backward")
    bench.add_argument("--stages", default="equal", help="ring: equal, balanced or sizes like 2,2,1,1")
    bench.set_defaults(func=cmd_bench)

    launch = sub.add_parser("launch", help="run a command in N local processes joined into one JAX runtime",
                            description="ringjax launch --processes N -- ringjax train --method ringada --devices N ...: "
                            "each process gets one CPU device (unless RINGJAX_CHILD_XLA_FLAGS says otherwise); "
                            "process 0 writes the run's files and prints")
    launch.add_argument("--processes", type=int, required=True, help="number of local processes")
    launch.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command every process runs")
    launch.set_defaults(func=cmd_launch)

    from ringjax.plan import cli as plan_cli

    plan = sub.add_parser("plan", help="placement (ringada, pac), allocation (deft) or layer selection (caff) for a fleet")
    plan_cli.add_plan_arguments(plan)
    plan.set_defaults(func=plan_cli.cmd_plan)

    calibrate = sub.add_parser("calibrate", help="measure this machine (matmul FLOP/s, memory) and write a profile")
    plan_cli.add_calibrate_arguments(calibrate)
    calibrate.set_defaults(func=plan_cli.cmd_calibrate)
    return parser


def main(argv=None) -> int:
    from ringjax.runtime import reuse_freed_memory

    args = build_parser().parse_args(argv)
    if args.command in ("train", "bench"):
        reuse_freed_memory()
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
