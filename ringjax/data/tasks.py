"""What a task is: its registry entry (`TaskSpec`) and its loaded rows (`Examples`).

Every loader (GLUE files, Hugging Face `datasets`, the built-in synthetic task) returns
`Examples`, and the trainer sizes its head and picks its metric from `TaskSpec`, so one
registry covers all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ringjax.errors import RingjaxError


@dataclass(frozen=True)
class TaskSpec:
    """One task: how its GLUE TSV files are laid out and how it is scored.

    Columns are named: by the file's header, or, for a header-less file (CoLA), by
    `columns`. `folder` is None for a built-in task that has no files.
    """

    name: str
    folder: str | None
    text_columns: tuple[str, ...]
    label_column: str
    num_labels: int  # 1 means regression
    metric: str  # the main metric, a name from ringjax.data.metrics
    label_names: tuple[str, ...] = ()  # string labels in the file, in class-id order
    columns: tuple[str, ...] = ()  # column names of a header-less file
    dev_file: str = "dev.tsv"
    score_range: tuple[float, float] | None = None  # regression labels must lie inside

    @property
    def has_header(self) -> bool:
        return not self.columns

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


@dataclass(frozen=True)
class Examples:
    """Loaded rows: one tuple of texts (one or two sentences) and one label per example.

    `labels` is int32 class ids, or float32 scores for a regression task.
    """

    texts: list[tuple[str, ...]]
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: np.ndarray) -> Examples:
        """The examples at `indices`, in that order (for subsets and owner shards)."""
        indices = np.asarray(indices, dtype=np.int64)
        return Examples([self.texts[i] for i in indices], self.labels[indices])


_PAIR = ("sentence1", "sentence2")
_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", "SST-2", ("sentence",), "label", 2, "accuracy"),
        TaskSpec(
            "cola", "CoLA", ("sentence",), "label", 2, "matthews_corrcoef",
            columns=("source", "label", "original_judgement", "sentence"),
        ),
        TaskSpec("stsb", "STS-B", _PAIR, "score", 1, "pearson", score_range=(0.0, 5.0)),
        TaskSpec("rte", "RTE", _PAIR, "label", 2, "accuracy", label_names=_ENTAILMENT),
        TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", 2, "f1"),
        TaskSpec(
            "qnli", "QNLI", ("question", "sentence"), "label", 2, "accuracy",
            label_names=_ENTAILMENT,
        ),
        TaskSpec(
            "mnli", "MNLI", _PAIR, "gold_label", 3, "accuracy",
            label_names=("entailment", "neutral", "contradiction"),
            dev_file="dev_matched.tsv",
        ),
        TaskSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", 2, "f1"),
        TaskSpec("synthetic", None, ("sentence",), "label", 2, "accuracy"),
    )
}


def get_task(name: str) -> TaskSpec:
    """The spec for `name`, case-insensitive, accepting GLUE folder spellings ("SST-2")."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise RingjaxError(
            f"unknown task {name!r}; use one of {', '.join(TASKS)} (case-insensitive)"
        )
    return TASKS[key]
