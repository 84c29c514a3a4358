"""Read GLUE task files (the `glue_data/<TASK>/*.tsv` layout) into `Examples`.

Files are split on tabs with no quote handling: GLUE sentences may start with or contain
`"`, and CSV quoting would silently merge rows. Every row is checked, and a bad one is
reported by file and line so the user can fix it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ringjax.data.tasks import Examples, TaskSpec, get_task
from ringjax.errors import RingjaxError

SPLITS = ("train", "dev")

_GLUE_HINT = "GLUE data goes in <data_dir>/<TASK>/{train,dev}.tsv, e.g. <data_dir>/SST-2/train.tsv"


def split_path(task: str | TaskSpec, data_dir: str | Path, split: str) -> Path:
    """The file holding `split` of `task` under the GLUE root `data_dir`.

    `data_dir` may also be the task folder itself (a path ending in `SST-2`).
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if spec.folder is None:
        raise RingjaxError(
            f"task {spec.name!r} is built in and has no files; load it with load_task_data"
        )
    if split not in SPLITS:
        raise RingjaxError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    root = Path(data_dir).expanduser()
    folder = root if root.name.lower() == spec.folder.lower() else root / spec.folder
    if not folder.is_dir():
        raise RingjaxError(f"no {spec.folder} folder at {folder}; {_GLUE_HINT}")
    path = folder / ("train.tsv" if split == "train" else spec.dev_file)
    if not path.is_file():
        raise RingjaxError(f"missing {path}; {_GLUE_HINT}")
    return path


def load_split(task: str | TaskSpec, data_dir: str | Path, split: str) -> Examples:
    """Load one split ("train" or "dev") of a GLUE task from the GLUE root `data_dir`."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    path = split_path(spec, data_dir, split)
    where = f"{path.parent.name}/{path.name}"
    # utf-8-sig drops a byte-order mark; split("\n") (not splitlines) keeps rare Unicode
    # separators such as U+2028 inside a sentence.
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    first = 0
    if spec.has_header:
        columns = tuple(lines[0].rstrip("\r").split("\t"))
        first = 1
    else:
        columns = spec.columns
    wanted = (*spec.text_columns, spec.label_column)
    missing = [name for name in wanted if name not in columns]
    if missing:
        raise RingjaxError(
            f"{where}: header has no column {missing[0]!r} (found {', '.join(columns)}); "
            f"check that this is the {spec.folder} file with its original header"
        )
    text_at = [columns.index(name) for name in spec.text_columns]
    label_at = columns.index(spec.label_column)
    texts: list[tuple[str, ...]] = []
    raw_labels: list[str] = []
    line_numbers: list[int] = []
    for number, line in enumerate(lines[first:], start=first + 1):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise RingjaxError(
                f"{where} line {number}: expected {len(columns)} tab-separated fields, "
                f"got {len(fields)}; fix or remove the row"
            )
        texts.append(tuple(fields[i] for i in text_at))
        raw_labels.append(fields[label_at])
        line_numbers.append(number)
    if not texts:
        raise RingjaxError(f"{where} has no rows; re-download the {spec.folder} files")
    labels = np.array(
        [_parse_label(spec, raw, where, n) for raw, n in zip(raw_labels, line_numbers)],
        dtype=np.float32 if spec.is_regression else np.int32,
    )
    return Examples(texts, labels)


def _parse_label(spec: TaskSpec, raw: str, where: str, line: int) -> int | float:
    """One label as a class id or a score, or an error naming the file and line."""
    at = f"{where} line {line}: label {raw!r}"
    if spec.label_names:
        if raw not in spec.label_names:
            raise RingjaxError(
                f"{at} is not one of {', '.join(spec.label_names)}; fix or remove the row"
            )
        return spec.label_names.index(raw)
    if spec.is_regression:
        try:
            score = float(raw)
        except ValueError:
            raise RingjaxError(f"{at} is not a number; fix or remove the row") from None
        low, high = spec.score_range or (-math.inf, math.inf)
        if not (math.isfinite(score) and low <= score <= high):
            raise RingjaxError(f"{at} is outside {low}..{high}; fix or remove the row")
        return score
    try:
        label = int(raw)
    except ValueError:
        raise RingjaxError(f"{at} is not an integer class id; fix or remove the row") from None
    if not 0 <= label < spec.num_labels:
        raise RingjaxError(
            f"{at} is outside 0..{spec.num_labels - 1}; fix or remove the row"
        )
    return label


# Hugging Face `glue` dataset: text columns and the split that plays GLUE's dev.tsv.
_HF_TEXT_COLUMNS = {
    "sst2": ("sentence",),
    "cola": ("sentence",),
    "stsb": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"),
    "qqp": ("question1", "question2"),
}


def load_hf_datasets(task: str, split: str) -> Examples:
    """Load a GLUE split through Hugging Face `datasets` (needs the package and a network).

    The hub's label ids use the same class order as `TaskSpec.label_names`.
    """
    spec = get_task(task)
    if spec.name not in _HF_TEXT_COLUMNS:
        raise RingjaxError(f"task {spec.name!r} is not on the Hugging Face hub; use load_task_data")
    if split not in SPLITS:
        raise RingjaxError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    try:
        import datasets
    except ImportError:
        raise RingjaxError(
            "the `datasets` package is not installed; pip install datasets, "
            "or read local GLUE files with load_split"
        ) from None
    hf_split = "train" if split == "train" else "validation"
    if spec.name == "mnli" and split == "dev":
        hf_split = "validation_matched"
    try:
        table = datasets.load_dataset("glue", spec.name, split=hf_split)
    except Exception as error:  # network, cache and hub errors all mean the same to the user
        raise RingjaxError(
            f"could not load glue/{spec.name} from the Hugging Face hub ({type(error).__name__}); "
            "check the network, or read local GLUE files with load_split"
        ) from error
    columns = [table[name] for name in _HF_TEXT_COLUMNS[spec.name]]
    dtype = np.float32 if spec.is_regression else np.int32
    return Examples(list(zip(*columns)), np.asarray(table["label"], dtype=dtype))
