"""Bad input gets one line naming the problem and the fix, exit code 2, no traceback."""

import json

import pytest

from ringjax.cli.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _glue(tmp_path, rows):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\na fine film \t1\n")
    return tmp_path


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--task", "no-such-task"], "unknown task"),
        (["--steps", "2", "--epochs", "1"], "exactly one of --steps"),
        (["--method", "bogus"], "unknown method"),
        (["--max-length", "4096"], "exceeds the model's limit"),
        (["--batch-size", "many"], "expects int"),
        (["--method", "ringada", "--train-norms"], "--train-norms apply to the single-device adapter"),
        (["--method", "houlsby", "--reduction-factor", "0"], "reduction_factor must be a positive integer"),
        (["--method", "houlsby", "--adapter-init-std", "0"], "adapter init std must be positive"),
        (["--method", "lora", "--adapter-init-std", "0.05"], "--adapter-init-std sets bottleneck adapters' init"),
        (["--method", "parallel", "--compute-dtype", "bfloat16"], "--compute-dtype bfloat16 applies to the single-device methods"),
        (["--method", "lora", "--compute-dtype", "float8"], "unknown compute dtype"),
        (["--method", "houlsby", "--side-every", "2"], "--side-every sets PAC's side network"),
        (["--method", "houlsby", "--lora-targets", "query"], "--lora-targets applies to --method lora"),
        (["--method", "lora", "--lora-targets", "query,nope"], "nope"),
        (["--method", "parallel", "--side-every", "0"], "side_every must be a positive integer"),
    ],
)
def test_bad_flags_give_one_line_errors(capsys, tmp_path, tiny_bert_dir, argv, needle):
    base = ["train", "--model", str(tiny_bert_dir), "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]
    code, err = _run(capsys, *base, *argv)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_directory_without_config_or_weights(capsys, tmp_path, tiny_bert_dir):
    code, err = _run(capsys, "train", "--model", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "no config.json" in err
    (tmp_path / "config.json").write_text((tiny_bert_dir / "config.json").read_text())
    code, err = _run(capsys, "train", "--model", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "no model.safetensors" in err


def test_malformed_row_names_its_line(capsys, tmp_path, tiny_bert_dir):
    data = _glue(tmp_path, "good \t1\nbad row without label\n")
    code, err = _run(capsys, "train", "--model", str(tiny_bert_dir), "--task", "sst2", "--data-dir", str(data),
                     "--steps", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "line 3" in err, err


def test_label_out_of_range(capsys, tmp_path, tiny_bert_dir):
    data = _glue(tmp_path, "good \t1\nodd \t7\n")
    code, err = _run(capsys, "train", "--model", str(tiny_bert_dir), "--task", "sst2", "--data-dir", str(data),
                     "--steps", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "7" in err and len(err.splitlines()) == 1, err


def test_existing_checkpoints_are_never_overwritten_and_resume_checks_config(capsys, tmp_path, tiny_bert_dir):
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_bert_dir), "--steps", "2", "--batch-size", "4", "--max-length", "16",
              "--max-train-examples", "16", "--max-eval-examples", "8", "--checkpoint-every", "1", "--out", str(out),
              "--no-progress"]
    assert main(common) == 0
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    code, err = _run(capsys, *common)
    assert code == 2 and "--resume" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == saved
    code, err = _run(capsys, *common, "--resume", "--seed", "3")
    assert code == 2 and "another configuration" in err and "seed" in err
    code, err = _run(capsys, *common, "--resume", "--compute-dtype", "bfloat16")
    assert code == 2 and "another configuration" in err and "compute_dtype" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["dev_metric_name"] == "accuracy"
