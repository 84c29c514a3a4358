"""`ringjax train --method pac` and `ringjax bench pac` end to end on the tiny model."""

import json
import os
from pathlib import Path

import pytest

from ringjax.cli.main import main
from ringjax.methods import activation_cache as ac

SUMMARY_KEYS = {"method", "task", "model", "dev_metric", "dev_metric_name", "dev", "train_seconds", "steps",
                "trainable_params", "epoch_seconds", "cache_bytes"}


def _train(model_dir, out, *extra):
    return ["train", "--method", "pac", "--model", str(model_dir), "--task", "synthetic", "--batch-size", "8",
            "--max-length", "16", "--max-train-examples", "64", "--max-eval-examples", "32", "--out", str(out),
            "--no-progress", *extra]


def _records(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line]


def _entry_stamps(cache):
    return {e["path"]: (os.stat(Path(e["path"], "taps.bin")).st_ino, os.stat(Path(e["path"], "taps.bin")).st_mtime_ns,
                        e["complete"]) for e in ac.list_entries(cache)}


def test_train_pac_writes_summary_and_a_rerun_reads_the_cache(tmp_path, tiny_bert_dir, capsys):
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    assert main(_train(tiny_bert_dir, first, "--devices", "2", "--epochs", "2", "--cache-dir", str(cache))) == 0
    s = json.loads((first / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s) and s["method"] == "pac" and s["dev_metric_name"] == "accuracy"
    assert len(s["epoch_seconds"]) == 2 and s["steps"] == 2 * (64 // 8) and s["cache_hit"] is False
    assert s["epoch1_forward"].startswith("ring pipeline, 2 stages")
    entries = ac.list_entries(cache)
    assert len(entries) == 2 and all(e["complete"] for e in entries)  # train and dev taps
    assert s["cache_bytes"] == sum(e["bytes"] for e in entries) > 0
    records = _records(first)
    assert [r["epoch"] for r in records] == [1, 2] and [r["source"] for r in records] == ["backbone", "cache"]
    assert all("accuracy" in r["dev"] for r in records)
    stamps = _entry_stamps(cache)

    # same model, data and max length: the rerun reads the cache from its first epoch, builds nothing
    second = tmp_path / "second"
    assert main(_train(tiny_bert_dir, second, "--devices", "2", "--epochs", "2", "--cache-dir", str(cache))) == 0
    s2 = json.loads((second / "summary.json").read_text())
    assert s2["cache_hit"] is True and s2["epoch1_forward"] == "none (cache hit)"
    assert [r["source"] for r in _records(second)] == ["cache", "cache"]
    assert _entry_stamps(cache) == stamps and s2["cache_bytes"] == s["cache_bytes"]
    # the cached taps are the ones the first run trained on: same losses
    for a, b in zip(records, _records(second)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)

    # the exported side network evaluates with the live backbone to the same dev accuracy
    capsys.readouterr()
    assert main(["eval", "--run", str(first)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(s["dev_metric"], abs=1 / 32 + 1e-9)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--steps", "2"], "give --epochs E instead of --steps"),
        ([], "PAC needs --epochs"),
        (["--epochs", "1.5"], "positive integer"),
        (["--epochs", "1", "--devices", "3"], "multiple of --devices 3"),
        (["--epochs", "1", "--devices", "16", "--batch-size", "16"], "16 devices asked for"),
        (["--epochs", "1", "--checkpoint-every", "2"], "no checkpoints"),
        (["--epochs", "1", "--cache-dtype", "int8"], "cache dtype"),
    ],
)
def test_bad_pac_flags_give_one_line_errors(capsys, tmp_path, tiny_bert_dir, extra, needle):
    assert main(_train(tiny_bert_dir, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_unusable_cache_dir_is_one_line(capsys, tmp_path, tiny_bert_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(_train(tiny_bert_dir, tmp_path / "o", "--epochs", "1", "--cache-dir", str(blocker))) == 2
    err = capsys.readouterr().err.strip()
    assert "not a directory" in err and len(err.splitlines()) == 1, err
    # a cache folder that cannot be created (a file in its path): caught when the build starts
    assert main(_train(tiny_bert_dir, tmp_path / "o", "--epochs", "1", "--cache-dir", str(blocker / "cache"))) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot build the activation cache" in err and "--cache-dir" in err and len(err.splitlines()) == 1, err


def test_bench_pac_prints_the_documented_keys(capsys, tiny_bert_dir):
    # one device and one baseline keep this to a few compilations; the defaults add Houlsby and 4 devices
    argv = ["bench", "pac", "--model", str(tiny_bert_dir), "--devices", "1", "--epochs", "2", "--baseline-epochs", "1",
            "--baselines", "full", "--batch", "8", "--seq", "16", "--train-examples", "32", "--dev-examples", "16",
            "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "task", "device", "n_devices", "batch_size", "memory_tokens", "methods", "ratios"} <= set(out)
    assert out["n_devices"] == 1 and out["memory_tokens"] == [8, 16] and set(out["methods"]) == {"pac", "full"}
    pac, full = out["methods"]["pac"], out["methods"]["full"]
    assert len(pac["epoch_seconds"]) == 2 and pac["cache_bytes"] > 0 and pac["memory"]["peak_bytes"] > 0
    assert len(full["epoch_seconds"]) == 1 and full["memory"]["peak_bytes"] > 0
    assert set(out["ratios"]) == {"epoch2_over_epoch1", "pac_over_full_peak_bytes", "houlsby_over_pac_total_seconds"}
    assert 0 < out["ratios"]["pac_over_full_peak_bytes"] < 1 and out["ratios"]["houlsby_over_pac_total_seconds"] is None
