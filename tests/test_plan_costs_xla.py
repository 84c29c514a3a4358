"""The analytic cost model agrees with XLA: total step FLOPs within 10% of `cost_analysis()` and
peak bytes within 15% of `memory_analysis()`, for MiniLM and a BERT-base-shaped model.

Each point compiles a training step twice (as it runs, and with unrolled layer loops for the
FLOP count), which takes a minute or more on a shared 2-core machine, so by default only a
few points run; `RINGJAX_XLA_GRID=full` runs the whole grid of experiments/deft_costs_vs_xla.py
(every method at several depths). XLA's figures are cached in pytest's cache directory, keyed
by the step's source code and the JAX version, so reruns are instant until the model changes.
"""

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "deft_costs_vs_xla", Path(__file__).resolve().parent.parent / "experiments" / "deft_costs_vs_xla.py")
grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid)

QUICK = {("minilm", "houlsby", 3), ("minilm", "full", 6), ("bert-base", "lora", 6)}
FULL = os.environ.get("RINGJAX_XLA_GRID") == "full"
POINTS = [(model, method, depth) for model, points in grid.GRID.items() for method, depth in points
          if FULL or (model, method, depth) in QUICK]


@pytest.fixture(scope="module")
def cache_dir(request, tmp_path_factory):
    """pytest's cache keeps compiled-cost results between runs; a fresh directory when it is disabled."""
    cache = getattr(request.config, "cache", None)
    return str(cache.mkdir("ringjax-xla-costs") if cache else tmp_path_factory.mktemp("ringjax-xla-costs"))


@pytest.mark.parametrize("model,method,depth", POINTS, ids=[f"{m}-{k}-{d}" for m, k, d in POINTS])
def test_step_costs_match_xla(model, method, depth, cache_dir):
    row = grid.check_point(model, method, depth, 8, 64, cache_dir)
    assert abs(row["flops_error"]) <= 0.10, row
    assert abs(row["peak_error"]) <= 0.15, row
