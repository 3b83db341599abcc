"""``report``'s long-context page: effective length and mean scores per setting (seeds
pooled, n/a kept), a heatmap per task and the loss-against-position plot, linked from
report.md; no page for runs without long-context results."""

from __future__ import annotations

import json

import yaml

from cope_megatron.report import write_report


def fake_run(root, name, pe, seed, score, effective):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"pe": pe}, "run": {"dir": str(run), "name": None}, "train": {"seed": seed}}))
    rows = {"niah_single_number": {
        "64": {"status": "not applicable", "reason": "the prompt needs 242 tokens"},
        "256": {"depths": {"0.0": {"greedy": score}, "1.0": {"greedy": score / 2}},
                "mean": {"greedy": 0.75 * score}, "samples": 2}}}
    ruler = {"tasks": rows, "average": {"greedy": {"64": None, "256": 0.75 * score}},
             "effective_length": {"greedy": {
                 "all": {"length": effective, "threshold": 0.5} if effective else
                 {"status": "not applicable", "reason": "no score at the training length"},
                 "niah_single_number": {"length": None, "threshold": 0.5,
                                        "reason": "below the threshold"}}}}
    curve = {str(n): {"bin_width": n // 4, "loss": [4.0, 3.5, 3.0, 2.5 + seed], "last_k": 64,
                      "last_k_loss": 2.0, "last_k_ppl": 7.0 + seed, "windows": 4}
             for n in (64, 128)}
    report = {"pe": pe, "train_length": 64, "lengths": {}, "sliding": {}, "ruler": ruler,
              "position_loss": curve}
    (run / "eval.json").write_text(json.dumps(report))
    return run


def test_long_context_page_pools_seeds_and_draws_each_task(tmp_path):
    runs = [fake_run(tmp_path, "cope-1", "cope", 1, 1.0, 256),
            fake_run(tmp_path, "cope-2", "cope", 2, 0.5, 128),
            fake_run(tmp_path, "rope-1", "rope", 1, 0.0, None)]
    report = write_report(runs, tmp_path / "report").read_text()
    assert "[long_context.md](long_context.md)" in report
    page = (tmp_path / "report" / "long_context.md").read_text()
    assert "| cope | 2 | 192 ± 64 | – |" in page  # effective length; no task reached it
    assert "| rope | 1 | n/a | – |" in page
    assert "| cope | n/a | 0.5625 ± 0.19 |" in page  # mean score per length
    assert "| cope | 8.5 ± 0.5 | 8.5 ± 0.5 |" in page  # last-k perplexity
    for png in ("ruler_niah_single_number.png", "loss_vs_position.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
        assert f"]({png})" in page


def test_no_long_context_page_without_its_results(tmp_path):
    run = fake_run(tmp_path, "rope-1", "rope", 1, 0.5, 64)
    data = json.loads((run / "eval.json").read_text())
    del data["ruler"], data["position_loss"]
    (run / "eval.json").write_text(json.dumps(data))
    assert "(long_context.md)" not in write_report([run], tmp_path / "report").read_text()
    assert not (tmp_path / "report" / "long_context.md").exists()
