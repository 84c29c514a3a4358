"""A built-in binary sentiment task ("synthetic") for offline demos and tests.

Sentences such as "honestly , the plot was not very dull , although the cast was weak"
are built from a small English vocabulary (each word one BERT wordpiece). The label is
the main clause's adjective polarity, flipped by a negation; an optional "although" clause
carries a random, uninformative adjective. No single token decides the label (the best one
scores about 60%) and a bag of words cannot tell which adjective the negation or the
"although" governs, so a model must use word order, yet a small model learns it in a few
hundred steps.
"""

from __future__ import annotations

import numpy as np

from ringjax.data.tasks import Examples
from ringjax.errors import RingjaxError

POSITIVE = ("good", "great", "wonderful", "excellent", "delightful", "charming",
            "brilliant", "enjoyable", "moving", "funny", "superb", "lovely")
NEGATIVE = ("bad", "terrible", "awful", "boring", "dull", "painful",
            "weak", "bland", "clumsy", "dreadful", "messy", "poor")
SUBJECTS = ("movie", "film", "story", "acting", "plot", "cast",
            "script", "ending", "soundtrack", "dialogue", "pacing", "camera")
VERBS = ("is", "was", "seemed", "felt")
NEGATIONS = ("not", "never", "hardly")
INTENSIFIERS = ("", "very", "really", "quite", "rather", "truly", "somewhat")
OPENERS = ("", "overall ,", "honestly ,", "frankly ,", "i think", "in the end ,")

NEGATION_RATE = 0.4  # a single-token (adjective) guess scores 1 - NEGATION_RATE
ALTHOUGH_RATE = 0.3

DEFAULT_SIZES = {"train": 4000, "dev": 500}
_SPLIT_STREAMS = {"train": 0, "dev": 1}


def synthetic_split(split: str, n: int | None = None, seed: int = 0) -> Examples:
    """`n` labelled sentences (default `DEFAULT_SIZES[split]`), fixed by (split, seed).

    Labels are balanced in expectation; train and dev come from different random streams.
    """
    if split not in _SPLIT_STREAMS:
        raise RingjaxError(f"unknown split {split!r}; use one of {', '.join(_SPLIT_STREAMS)}")
    n = DEFAULT_SIZES[split] if n is None else n
    if n < 1 or seed < 0:
        raise RingjaxError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    rng = np.random.default_rng((seed, _SPLIT_STREAMS[split]))
    labels = rng.integers(0, 2, n)
    texts = [(_sentence(rng, int(label)),) for label in labels]
    return Examples(texts, labels.astype(np.int32))


def _sentence(rng: np.random.Generator, label: int) -> str:
    negated = rng.random() < NEGATION_RATE
    positive = bool(label) != negated
    words = [_pick(rng, OPENERS), "the", _pick(rng, SUBJECTS), _pick(rng, VERBS)]
    if negated:
        words.append(_pick(rng, NEGATIONS))
    words += [_pick(rng, INTENSIFIERS), _pick(rng, POSITIVE if positive else NEGATIVE)]
    main = " ".join(word for word in words if word)
    if rng.random() >= ALTHOUGH_RATE:
        return main
    aside = (
        f"although the {_pick(rng, SUBJECTS)} {_pick(rng, VERBS)} "
        f"{_pick(rng, POSITIVE + NEGATIVE)}"
    )
    return f"{aside} , {main}" if rng.random() < 0.5 else f"{main} , {aside}"


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]
