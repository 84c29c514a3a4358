"""`ringjax bench ring`: one JSON object in the issue's shape, measured on a tiny model, with the
emulated devices the CLI makes itself (`--devices N`, no device count in XLA_FLAGS)."""

import json
import os
import subprocess
import sys

from ringjax.cli.main import main


def test_bench_ring_prints_the_issue_shape(tiny_bert_dir):
    # A fresh process: XLA_FLAGS carries no device count (the CLI asks JAX for --devices CPU
    # devices itself) and the lowest backend optimisation level (compile time dominates here).
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    entry = "import sys; from ringjax.cli.main import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", entry, "bench", "ring", "--model", str(tiny_bert_dir),
                           "--devices", "2", "--microbatches", "2", "--batch", "4", "--seq", "8", "--depths", "1,4",
                           "--repeats", "1", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert set(result) == {"single_device", "depths"}
    single = result["single_device"]
    assert set(single) == {"seconds_per_step", "flops", "peak_bytes"}
    assert single["seconds_per_step"] > 0 and single["flops"] > 0 and single["peak_bytes"] > 0
    assert [d["depth"] for d in result["depths"]] == [1, 4]
    for d in result["depths"]:
        assert set(d) == {"depth", "seconds_per_step", "flops", "peak_bytes", "bubble_fraction"}
        assert len(d["flops"]) == 2 and len(d["peak_bytes"]) == 2  # one entry per device
        assert all(f > 0 for f in d["flops"]) and all(b > 0 for b in d["peak_bytes"])
        assert 0.0 <= d["bubble_fraction"] < 1.0
    top, every = result["depths"]
    assert sum(top["flops"]) < sum(every["flops"])  # early-stopped backprop does less work


def test_bench_ring_rejects_bad_depths(capsys, tiny_bert_dir):
    code = main(["bench", "ring", "--model", str(tiny_bert_dir), "--devices", "2", "--microbatches", "2",
                 "--batch", "4", "--seq", "8", "--depths", "1,9", "--repeats", "1", "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "1..4" in err and len(err.splitlines()) == 1, err


def test_action_flops_count_the_top_stage_as_it_runs():
    """Stages 3, 1, 1, 1: the top stage's one block computes the [CLS] position only (with the
    encoder's (mb, 1, 1, T) attention bias, as the ring step passes it), so its forward and
    backward cost well under those of stage 1's whole block."""
    from test_ring_pipeline import tiny_model

    from ringjax.parallel import RingPipeline, make_stage_mesh, plan_stages
    from ringjax.parallel.bench import action_flops

    cfg, spec, head, params, *_ = tiny_model()
    pipe = RingPipeline(cfg, spec, head, make_stage_mesh(4), plan_stages(6, 4, (3, 1, 1, 1)), 4, 6)
    assert [p.first_only for p in pipe.programs] == [False, False, False, True]
    costs = action_flops(pipe, params, 8, 8)
    for kind in ("fwd", "bwd"):
        assert costs[(kind, 3)] < 0.6 * costs[(kind, 1)], (kind, costs)
