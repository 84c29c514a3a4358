"""Task data: GLUE and synthetic loading, metrics, tokenisation, batching and partitioning."""

from ringjax.data.batching import Batch, BatchStream, default_buckets, eval_batches
from ringjax.data.glue import load_hf_datasets, load_split
from ringjax.data.load import load_task_data
from ringjax.data.metrics import (
    accuracy,
    f1,
    main_metric_name,
    matthews_corrcoef,
    pearson,
    spearman,
    task_metric,
)
from ringjax.data.partition import partition
from ringjax.data.synthetic import synthetic_split
from ringjax.data.tasks import TASKS, Examples, TaskSpec, get_task
from ringjax.data.tokenize import Encoded, encode

__all__ = [
    "TASKS",
    "Batch",
    "BatchStream",
    "Encoded",
    "Examples",
    "TaskSpec",
    "accuracy",
    "default_buckets",
    "encode",
    "eval_batches",
    "f1",
    "get_task",
    "load_hf_datasets",
    "load_split",
    "load_task_data",
    "main_metric_name",
    "matthews_corrcoef",
    "partition",
    "pearson",
    "spearman",
    "synthetic_split",
    "task_metric",
]
