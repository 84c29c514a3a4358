"""GLUE file reading, the task registry and `load_task_data`, on tiny TSVs written here."""

import sys

import numpy as np
import pytest

from ringjax.data import (
    TASKS,
    get_task,
    load_hf_datasets,
    load_split,
    load_task_data,
)
from ringjax.errors import RingjaxError


STSB_HEADER = "\t".join(
    "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
)


def write(root, folder, name, text, bom=False):
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_task_names_are_case_and_punctuation_insensitive():
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("sts_b") is TASKS["stsb"]
    assert get_task("MNLI").dev_file == "dev_matched.tsv"
    assert get_task("stsb").is_regression and not get_task("cola").has_header
    with pytest.raises(RingjaxError, match="unknown task 'wnli'.*sst2, cola"):
        get_task("wnli")


def test_sst2_with_bom_and_quote_chars(tmp_path):
    # A lone quote would make default CSV quoting swallow the following rows.
    write(
        tmp_path, "SST-2", "train.tsv",
        'sentence\tlabel\n"a quote starts this \t1\nplain " middle\t0\nlast row \t1\n',
        bom=True,
    )
    examples = load_split("SST-2", tmp_path, "train")
    assert examples.texts == [('"a quote starts this ',), ('plain " middle',), ("last row ",)]
    assert examples.labels.dtype == np.int32
    assert examples.labels.tolist() == [1, 0, 1]


def test_cola_without_header_or_final_newline(tmp_path):
    body = "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the."  # no final newline
    write(tmp_path, "CoLA", "dev.tsv", body)
    examples = load_split("cola", tmp_path, "dev")
    assert examples.texts == [("The sailors rode.",), ("Rode sailors the.",)]
    assert examples.labels.tolist() == [1, 0]


def test_stsb_pairs_and_float_scores_with_crlf(tmp_path):
    rows = ["0\tg\tf\t2012\t0\tnone\tnone\tA man.\tA person.\t4.750",
            "1\tg\tf\t2012\t1\tnone\tnone\tA cat.\tA dog.\t0.5"]
    write(tmp_path, "STS-B", "dev.tsv", "\r\n".join([STSB_HEADER, *rows]) + "\r\n")
    examples = load_split("stsb", tmp_path, "dev")
    assert examples.texts == [("A man.", "A person."), ("A cat.", "A dog.")]
    assert examples.labels.dtype == np.float32
    np.testing.assert_allclose(examples.labels, [4.75, 0.5])


def test_string_labels_and_mnli_dev_matched(tmp_path):
    write(tmp_path, "RTE", "train.tsv",
          "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n")
    assert load_split("rte", tmp_path, "train").labels.tolist() == [1, 0]
    write(tmp_path, "MNLI", "dev_matched.tsv",
          "index\tsentence1\tsentence2\tlabel1\tgold_label\n0\ta\tb\tneutral\tcontradiction\n")
    assert load_split("mnli", tmp_path, "dev").labels.tolist() == [2]


def test_data_dir_may_be_the_task_folder(tmp_path):
    write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\nok\t1\n")
    assert len(load_split("sst2", tmp_path / "SST-2", "dev")) == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", r"SST-2/train.tsv line 3: expected 2.*got 3"),
        ("sentence\tlabel\ngood\t1\nbad\t2\n", r"line 3: label '2' is outside 0..1"),
        ("sentence\tlabel\ngood\tpositive\n", r"line 2: label 'positive' is not an integer"),
        ("text\tlabel\ngood\t1\n", r"header has no column 'sentence'"),
        ("sentence\tlabel\n", r"has no rows"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, body, message):
    write(tmp_path, "SST-2", "train.tsv", body)
    with pytest.raises(RingjaxError, match=message):
        load_split("sst2", tmp_path, "train")


def test_bad_string_and_score_labels(tmp_path):
    write(tmp_path, "QNLI", "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tq\ts\tmaybe\n")
    with pytest.raises(RingjaxError, match="line 2: label 'maybe' is not one of entailment"):
        load_split("qnli", tmp_path, "dev")
    write(tmp_path, "STS-B", "train.tsv", f"{STSB_HEADER}\n0\tg\tf\ty\t0\tn\tn\ta\tb\t5.5\n")
    with pytest.raises(RingjaxError, match=r"line 2: label '5.5' is outside 0.0..5.0"):
        load_split("stsb", tmp_path, "train")


def test_missing_data_says_where_glue_goes(tmp_path):
    with pytest.raises(RingjaxError, match=r"no SST-2 folder .*GLUE data goes in"):
        load_split("sst2", tmp_path, "train")
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(RingjaxError, match=r"missing .*train.tsv"):
        load_split("sst2", tmp_path, "train")
    with pytest.raises(RingjaxError, match="unknown split 'test'"):
        load_split("sst2", tmp_path, "test")
    with pytest.raises(RingjaxError, match="pass the GLUE folder"):
        load_task_data("sst2", None, "train")


def test_load_task_data_subsets_deterministically(tmp_path):
    rows = "".join(f"sentence {i}\t{i % 2}\n" for i in range(50))
    write(tmp_path, "SST-2", "train.tsv", "sentence\tlabel\n" + rows)
    a = load_task_data("sst2", tmp_path, "train", max_examples=10, seed=3)
    b = load_task_data("sst2", tmp_path, "train", max_examples=10, seed=3)
    c = load_task_data("sst2", tmp_path, "train", max_examples=10, seed=4)
    assert a.texts == b.texts and a.texts != c.texts
    numbers = [int(text[0].split()[1]) for text in a.texts]
    assert numbers == sorted(numbers) and len(set(numbers)) == 10
    assert a.labels.tolist() == [n % 2 for n in numbers]
    assert len(load_task_data("sst2", tmp_path, "train", max_examples=500)) == 50


def test_load_task_data_synthetic_needs_no_files():
    examples = load_task_data("synthetic", None, "dev", max_examples=20)
    assert len(examples) == 20 and examples.labels.dtype == np.int32
    with pytest.raises(RingjaxError, match="built in and has no files"):
        load_split("synthetic", "/nowhere", "train")


def test_hf_loader_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RingjaxError, match="`datasets` package is not installed"):
        load_hf_datasets("sst2", "train")
