"""Two processes on localhost (gloo collectives) run the ring and get the emulated ring's numbers.

The test launches this file twice through `ringjax.parallel.launch` (one CPU device per
process); each child joins the distributed runtime, runs one ring case of test_ring_pipeline
and saves its loss and gradients. It is marked `multiprocess` and never skipped.
"""

import os
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


if __name__ == "__main__":
    worker(sys.argv[1])
