"""Resuming after a hard kill continues exactly: same losses, the same log, bitwise-equal final parameters."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.numpy import load_file

STEPS = 12


def _cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "ringjax.cli.main", "train", "--model", str(model_dir), "--task", "synthetic",
            "--method", "houlsby", "--steps", str(STEPS), "--batch-size", "8", "--max-length", "16",
            "--max-train-examples", "200", "--max-eval-examples", "40", "--checkpoint-every", "4",
            "--out", str(out), "--no-progress", *extra]


def _records(out):
    return list(map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()))


def _losses(out):
    return [r["loss"] for r in _records(out) if "loss" in r]


def _log_shape(out):
    """(step, fields) of every metrics record: what a resume must reproduce, timings aside."""
    return [(r["step"], sorted(r)) for r in _records(out)]


def test_resume_after_sigkill_is_bitwise_identical(tiny_bert_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole = tmp_path / "whole"
    subprocess.run(_cmd(tiny_bert_dir, whole), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_bert_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "8").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "8").is_dir(), "the run never wrote its step-8 checkpoint"
    assert not (killed / "summary.json").exists(), "the run finished before it was killed; the test proves nothing"

    subprocess.run(_cmd(tiny_bert_dir, killed, "--resume"), check=True, env=env, capture_output=True)
    assert _losses(killed) == _losses(whole)
    assert len(_losses(whole)) == STEPS
    a, b = load_file(str(whole / "trainable.safetensors")), load_file(str(killed / "trainable.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert _log_shape(killed) == _log_shape(whole)
    # resuming a finished run evaluates again and keeps one final record
    subprocess.run(_cmd(tiny_bert_dir, killed, "--resume"), check=True, env=env, capture_output=True)
    assert _log_shape(killed) == _log_shape(whole)
    assert [r for r in _records(killed) if "dev" in r] == [r for r in _records(whole) if "dev" in r]
