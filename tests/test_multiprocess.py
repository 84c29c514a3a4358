"""Two processes on localhost (gloo collectives) run the ring and get the emulated ring's numbers.

The test launches this file twice through `ringjax.parallel.launch` (one CPU device per
process); each child joins the distributed runtime, runs one ring case of test_ring_pipeline
and saves its loss and gradients; a second test runs `ringjax launch --processes 2 -- ringjax train`
end to end. Both are marked `multiprocess` and never skipped.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CASE = (2, 4, 1, (4, 2), "1f1b", "keep", True)  # owners alternate: head and gradients cross processes


def worker(out_path: str) -> None:
    from ringjax.parallel import maybe_initialize_distributed

    assert maybe_initialize_distributed(), "launched without the coordinator environment"
    import jax

    from test_ring_pipeline import ring_result

    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
    loss, grads = ring_result(*CASE)
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
        np.savez(out_path, loss=loss, **{jax.tree_util.keystr(p): np.asarray(g) for p, g in leaves})


@pytest.mark.multiprocess
def test_two_processes_give_the_emulated_ring_loss_and_gradients(tmp_path):
    import jax

    from ringjax.parallel.launch import launch
    from test_ring_pipeline import ring_result

    out = tmp_path / "ring.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))}
    results = launch(2, [sys.executable, __file__, str(out)], timeout=300, env=env)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    loss, grads = ring_result(*CASE)  # the same case on 2 emulated devices in this process
    assert float(got["loss"]) == pytest.approx(loss, rel=1e-6, abs=1e-7)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        np.testing.assert_allclose(got[jax.tree_util.keystr(path)], g, rtol=1e-6, atol=1e-7)


# both stages train (gradients cross the processes); the phase itself is tested in test_ring_train
TRAIN = ["train", "--method", "ringada", "--devices", "2", "--microbatches", "2", "--steps", "2", "--batch-size", "4",
         "--max-length", "16", "--unfreeze", "top:3", "--max-train-examples", "16", "--max-eval-examples", "4",
         "--checkpoint-every", "1", "--no-progress"]


@pytest.mark.multiprocess
def test_launch_cli_trains_like_the_emulated_ring_and_only_process_0_writes(tmp_path, capsys, tiny_bert_dir):
    """`ringjax launch --processes 2 -- ringjax train ...`: the same losses as the emulated run,
    one metrics log and one printed summary (process 0's), and orbax checkpoints every process
    saved collectively."""
    from ringjax.cli.main import main
    from ringjax.train.checkpoint import Checkpointer

    args = [*TRAIN, "--model", str(tiny_bert_dir)]
    assert main([*args, "--out", str(tmp_path / "emulated")]) == 0  # 2 of this process's 8 emulated devices
    capsys.readouterr()

    entry = "import sys; from ringjax.cli.main import main; sys.exit(main())"
    # one CPU device per process, compiled at the lowest backend optimisation level (compile time dominates)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RINGJAX_CHILD_XLA_FLAGS": "--xla_backend_optimization_level=0"}
    done = subprocess.run([sys.executable, "-c", entry, "launch", "--processes", "2", "--", "ringjax", *args,
                           "--out", str(tmp_path / "launched")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["steps"] == 2, done.stdout

    def losses(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["depth"], r["loss"]) for r in records if "loss" in r]

    launched, emulated = losses("launched"), losses("emulated")
    assert [s for s, _, _ in launched] == [1, 2]  # one writer: no step logged twice
    for (s, d, a), (t, e, b) in zip(launched, emulated, strict=True):
        assert (s, d) == (t, e) and a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert sorted(p.name for p in (tmp_path / "launched").iterdir() if p.suffix == ".jsonl") == ["metrics.jsonl"]
    ckpt = Checkpointer(tmp_path / "launched")
    assert ckpt.manager.all_steps() == Checkpointer(tmp_path / "emulated").manager.all_steps() == [1, 2]
    import orbax.checkpoint as ocp

    record = ckpt.manager.restore(2, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    assert record["data_position"] == 2 and record["extra"]["unfreeze"]["depth"] == 3


if __name__ == "__main__":
    worker(sys.argv[1])
