"""`ringjax train --method caff|fedavg-full|fedlora|uniform-t`: per-round records, the summary, one-line errors."""

import json

import pytest
import yaml

from ringjax.cli.main import main

BATCH, SEQ, STEPS = 4, 16, 2


def write_fleet(path, model_dir, dead: bool = True, scale: float = 1.0):
    """Tiers sized from the cost model of the tiny BERT: weak trains the top block, strong
    everything (full fine-tuning too); `dead` adds one client that cannot afford the head.
    (Two live tiers, not three: every distinct job costs two compilations, and tests stay short.)"""
    import ringjax
    from ringjax.fl import CostModel, LocalJob, Workload

    cfg = ringjax.ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    costs = CostModel(cfg, ringjax.HeadConfig("classification", 2), Workload(BATCH, SEQ, STEPS))
    L = cfg.num_layers

    def budget(*jobs, memory_margin=1.01):
        cs = [costs.cost(j) for j in jobs]
        return {"memory": max(c.memory_bytes for c in cs) * memory_margin * scale,
                "flops_per_round": max(c.flops_per_round for c in cs) * 1.01 * scale,
                "upload": max(c.upload_bytes for c in cs) * 1.01 * scale}

    tiers = [{"name": "weak", "count": 2, **budget(LocalJob("top-t", 1))},
             # the memory model is ~17% under XLA's measured peak for full fine-tuning with this
             # model's 30k-word embedding (a second embedding-sized buffer): leave room for it
             {"name": "strong", "count": 2, **budget(LocalJob("top-t", L), LocalJob("full", L), memory_margin=1.3)}]
    if dead:
        tiers.append({"name": "dead", "count": 1, "memory": "1kB", "flops_per_round": 1.0, "upload": "1kB"})
    path.write_text(yaml.safe_dump({"tiers": tiers}))
    return path, sum(t["count"] for t in tiers)


def common(model_dir, out, fleet, clients, rounds=2, per_round=4):
    """Flags of a short run; by default every eligible client takes part each round, so round 2
    reuses round 1's executables (same groups, one length bucket)."""
    return ["train", "--model", str(model_dir), "--task", "synthetic", "--max-train-examples", "64",
            "--max-eval-examples", "32", "--batch-size", str(BATCH), "--max-length", str(SEQ),
            "--local-steps", str(STEPS), "--clients", str(clients), "--per-round", str(per_round), "--rounds", str(rounds),
            "--alpha", "0.5", "--fleet", str(fleet), "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("method", ["caff", "fedavg-full"])
def test_federated_cli_writes_rounds_and_summary(capsys, tmp_path, tiny_bert_dir, method):
    fleet, clients = write_fleet(tmp_path / "fleet.yaml", tiny_bert_dir)
    out = tmp_path / method
    assert main([*common(tiny_bert_dir, out, fleet, clients), "--method", method]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())

    assert [r["round"] for r in records] == [1, 2]
    excluded = 1 if method == "caff" else 3  # full fine-tuning: only the two strong clients can
    said = [line for line in printed.splitlines() if line.startswith(f"[{method}]") and "excluded" in line]
    assert len(said) == 1 and f"({excluded} excluded)" in said[0], printed  # said once, before the rounds
    for r in records:
        assert r["dev_metric_name"] == "accuracy" and 0 <= r["dev_metric"] <= 1
        assert r["excluded"] == excluded and r["participants"] == len(r["clients"]) == min(4, clients - excluded)
        assert r["bytes_uploaded"] > 0 and r["mean_depth"] > 0
    assert records[-1]["total_bytes_uploaded"] == sum(r["bytes_uploaded"] for r in records)

    assert summary["method"] == method and summary["rounds"] == 2 and summary["excluded"] == excluded
    assert summary["dev_metric"] == records[-1]["dev_metric"] and summary["dev_metric_name"] == "accuracy"
    assert summary["total_bytes_uploaded"] == records[-1]["total_bytes_uploaded"]
    assert summary["train_seconds"] > 0
    if method == "caff":
        assert summary["tier_depths"] == {"weak": [1], "strong": [4], "dead": [-1]}
    else:
        assert summary["tier_depths"]["strong"] == [4] and summary["tier_depths"]["weak"] == [-1]
    # every job's compiled peak bytes sits within the memory budget of the clients that run it
    budgets = {t["name"]: t["memory"] for t in yaml.safe_load(fleet.read_text())["tiers"]}
    runs_on = {"top-t-1": "weak", "top-t-4": "strong"} if method == "caff" else {"full-4": "strong"}
    assert set(summary["measured_peak_bytes"]) == set(runs_on)
    for job, peak in summary["measured_peak_bytes"].items():
        assert 0 < peak <= budgets[runs_on[job]], (job, peak)
    assert (out / "federated.json").exists() and (out / "config.json").exists()


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--fleet", None], "needs --fleet"),
        (["--per-round", "9"], "cannot sample 9 clients"),
        (["--steps", "3"], "not --steps"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--candidates", "2", "--method", "uniform-t"], "--candidates is CAFF's"),
        (["--sampling", "some"], "unknown sampling 'some'"),
    ],
)
def test_federated_bad_input_is_one_line(capsys, tmp_path, tiny_bert_dir, extra, needle):
    fleet, clients = write_fleet(tmp_path / "fleet.yaml", tiny_bert_dir)
    argv = [*common(tiny_bert_dir, tmp_path / "o", fleet, clients), "--method", "caff"]
    if extra[:2] == ["--fleet", None]:
        i = argv.index("--fleet")
        del argv[i : i + 2]
        extra = []
    code, err = _err(capsys, [*argv, *extra])
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_fleet_no_client_can_meet_is_one_line(capsys, tmp_path, tiny_bert_dir):
    fleet, clients = write_fleet(tmp_path / "fleet.yaml", tiny_bert_dir, scale=1e-3)
    code, err = _err(capsys, [*common(tiny_bert_dir, tmp_path / "o", fleet, clients), "--method", "caff"])
    assert code == 2 and "no client's budgets afford" in err and len(err.splitlines()) == 1, err
