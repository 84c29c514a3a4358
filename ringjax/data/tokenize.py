"""Tokenise `Examples` once, into flat ragged arrays that batching slices without Python loops.

Tokens are kept unpadded (one flat array plus offsets): padding is chosen per batch by
`ringjax.data.batching`, and a flat array stays small for large tasks and long `max_length`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ringjax.data.tasks import Examples
from ringjax.errors import RingjaxError

_CHUNK = 8192  # rows per tokenizer call: bounds the Python lists alive at once


@dataclass(frozen=True)
class Encoded:
    """Token ids of every example, concatenated; example i is `[offsets[i], offsets[i+1])`."""

    input_ids: np.ndarray  # (total_tokens,) int32
    token_type_ids: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n + 1,) int64
    labels: np.ndarray  # (n,) int32 class ids or float32 scores
    max_length: int
    pad_id: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and token type ids of example `i`."""
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:stop], self.token_type_ids[start:stop]


def encode(
    examples: Examples,
    tokenizer: Any,
    max_length: int,
    model_max_length: int | None = None,
) -> Encoded:
    """Tokenise with a Hugging Face tokenizer, truncating to `max_length` tokens.

    Sentence pairs go through the tokenizer's pair API (separator and token types 0/1;
    the longer sentence is truncated first). `model_max_length` is the backbone's position
    limit; a larger `max_length` is refused rather than failing later inside the model.
    """
    pair = bool(examples.texts) and len(examples.texts[0]) == 2
    if model_max_length is not None and max_length > model_max_length:
        raise RingjaxError(
            f"max_length {max_length} exceeds the model's limit of {model_max_length} "
            f"positions; use max_length <= {model_max_length}"
        )
    minimum = tokenizer.num_special_tokens_to_add(pair=pair) + 1
    if max_length < minimum:
        raise RingjaxError(
            f"max_length {max_length} leaves no room for text after the special tokens; "
            f"use max_length >= {minimum}"
        )
    if any(len(texts) != len(examples.texts[0]) for texts in examples.texts):
        raise RingjaxError("examples mix single sentences and pairs; load one task at a time")
    ids: list[np.ndarray] = []
    type_ids: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for start in range(0, len(examples), _CHUNK):
        rows = examples.texts[start : start + _CHUNK]
        columns = [list(column) for column in zip(*rows)]
        batch = tokenizer(
            *columns,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=True,
        )
        chunk_lengths = np.fromiter(map(len, batch["input_ids"]), np.int64, len(rows))
        total = int(chunk_lengths.sum())
        ids.append(_flatten(batch["input_ids"], total))
        type_ids.append(_flatten(batch["token_type_ids"], total))
        lengths.append(chunk_lengths)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    empty = np.zeros(0, np.int32)
    return Encoded(
        input_ids=np.concatenate(ids) if ids else empty,
        token_type_ids=np.concatenate(type_ids) if type_ids else empty,
        offsets=np.concatenate([[0], np.cumsum(all_lengths)]).astype(np.int64),
        labels=examples.labels,
        max_length=max_length,
        pad_id=int(tokenizer.pad_token_id or 0),
    )


def _flatten(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), np.int32, total)
