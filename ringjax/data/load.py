"""One entry point for task data, GLUE folder or built-in, so scripts take just a task name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ringjax.data.glue import load_split
from ringjax.data.synthetic import synthetic_split
from ringjax.data.tasks import Examples, get_task
from ringjax.errors import RingjaxError


def load_task_data(
    task: str,
    data_dir: str | Path | None,
    split: str,
    max_examples: int | None = None,
    seed: int = 0,
) -> Examples:
    """A split of `task`; at most `max_examples`, a random subset (fixed by `seed`) in file order.

    The "synthetic" task needs no `data_dir` and generates `max_examples` sentences
    (default `synthetic.DEFAULT_SIZES[split]`).
    """
    spec = get_task(task)
    if max_examples is not None and max_examples < 1:
        raise RingjaxError(f"max_examples must be at least 1, got {max_examples}")
    if spec.folder is None:
        return synthetic_split(split, max_examples, seed)
    if data_dir is None:
        raise RingjaxError(
            f"task {spec.name!r} reads GLUE files; pass the GLUE folder that holds "
            f"{spec.folder}/train.tsv as data_dir"
        )
    examples = load_split(spec, data_dir, split)
    if max_examples is None or max_examples >= len(examples):
        return examples
    keep = np.random.default_rng(seed).choice(len(examples), max_examples, replace=False)
    return examples.select(np.sort(keep))
