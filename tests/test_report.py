"""``report``: a markdown table and non-empty PNGs from fixture run directories, seeds
pooled, not-applicable lengths marked, and one clear error for a directory that is no run."""

from __future__ import annotations

import json

import pytest
import yaml

from cope_megatron.cli import main
from cope_megatron.report import ReportError, write_report


def fake_run(root, name, pe, seed, ppl, task=None, task_name=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"pe": pe}, "run": {"dir": str(run), "name": None}, "train": {"seed": seed},
         "task": {"name": task_name}}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 / s, "tokens_per_s": 1000.0}) + "\n"
        for s in range(1, 11)))
    if task:
        report = {"task": "flipflop", "splits": {
            "test": {"error_pct": task[0]}, "ood_sparse": {"error_pct": task[1]}}}
    else:
        lengths = {str(64 * 2**k): ({"ppl": p, "loss": 1.0, "tokens": 256} if p else
                                    {"status": "not applicable", "reason": "x"})
                   for k, p in enumerate(ppl)}
        report = {"pe": pe, "train_length": 64, "lengths": lengths, "sliding": lengths,
                  "passkey": {k: {"0.0": 1.0, "1.0": 0.5, "samples": 2} for k in lengths}}
    (run / "eval.json").write_text(json.dumps(report))
    return run


def test_report_pools_seeds_into_tables_and_plots(tmp_path):
    runs = [fake_run(tmp_path, "rope-1", "rope", 1, [10.0, 20.0]),
            fake_run(tmp_path, "rope-2", "rope", 2, [12.0, 22.0]),
            fake_run(tmp_path, "learned-1", "learned", 1, [11.0, None]),
            fake_run(tmp_path, "ff-cope", "cope", 1, None, task=(0.5, 4.0)),
            fake_run(tmp_path, "ff-nope", "nope", 1, None, task=(6.0, 30.0))]
    (tmp_path / "pending").mkdir()
    (tmp_path / "pending" / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"pe": "alibi"}, "run": {"name": "alibi-pending"}}))
    path = write_report([*runs, tmp_path / "pending"], tmp_path / "report")
    text = path.read_text()
    assert "| rope | 2 | 11 ± 1 | 21 ± 1 |" in text
    assert "| learned | 1 | 11 | n/a |" in text
    assert "| cope | 1 | 0.5 | 4 |" in text and "| nope | 1 | 6 | 30 |" in text
    assert "| rope | 0.75 | 0.75 |" in text  # passkey: mean over depths
    assert "Not evaluated yet: " in text and "pending" in text
    for png in ("perplexity_vs_length.png", "passkey.png", "task_error.png",
                "training_loss.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        assert f"]({png})" in text


def test_runs_of_several_tasks_are_not_pooled_as_seeds(tmp_path):
    runs = [fake_run(tmp_path, f"{task}-{seed}", "rope", seed, None, task=errors,
                     task_name=task)
            for task, errors in (("niah_single", (1.0, 50.0)), ("vt", (10.0, 80.0)))
            for seed in (1, 2)]
    text = write_report(runs, tmp_path / "report").read_text()
    assert "| niah_single: rope | 2 | 1 | 50 |" in text and "| vt: rope | 2 | 10 | 80 |" in text


def test_report_command_prints_the_path_and_names_a_bad_directory(tmp_path, capsys):
    run = fake_run(tmp_path, "rope-1", "rope", 1, [10.0])
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.md")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "nothing is not a run directory" in capsys.readouterr().err
    with pytest.raises(ReportError):
        write_report([], tmp_path / "x")
