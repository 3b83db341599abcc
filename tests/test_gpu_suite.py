"""bench/gpu_suite.sh, the one prepared GPU check, in its dry mode (every stage at CPU
size): every stage reports, the JSON holds what the next GPU session needs, and a stage
over its budget is cut while the later ones still run. Also the reading of pytest's
output, crash included, which the dry mode (all GPU tests skipped) cannot show."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_suite_report import TRAINING_TESTS, pytest_outcomes
from bench.gpu_suite_report import stage as stage_record

ROOT = Path(__file__).resolve().parents[1]

TABLES = {"op": "results_cope_op_gpu.txt", "train": "results_train_throughput_gpu.txt",
          "memory": "results_activation_memory_gpu.txt"}


@pytest.mark.integration
def test_dry_run_reports_every_stage_and_cuts_the_one_over_budget(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_SUITE_DRY": "1", "GPU_SUITE_PYTHON": sys.executable,
           "OUT": str(out), "GPU_SUITE_BUDGET_A": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_suite.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    report = json.loads((out / "gpu_suite.json").read_text())
    assert {"date", "device", "torch", "triton", "python", "dry", "ok", "stages"} <= set(report)
    assert report["dry"] is True and report["ok"] is False  # one stage was cut
    stages = report["stages"]
    assert list(stages) == ["install", "tests", "op", "train", "memory"]
    for stage in stages.values():
        assert {"stage", "status", "exit_code", "elapsed_s", "budget_s", "table",
                "not_available"} <= set(stage)
    assert stages["tests"]["status"] == "cut" and stages["tests"]["budget_s"] == 1
    assert stages["tests"]["elapsed_s"] < 15
    for name, table in TABLES.items():  # the stages after the cut one still ran
        assert stages[name]["status"] == "ok", (name, stages[name])
        assert stages[name]["table"] == table and (out / table).is_file()
        assert stages[name]["results"] and all("rows" in r for r in stages[name]["results"])
    op_rows = [r for result in stages["op"]["results"] for r in result["rows"]]
    assert {r["impl"] for r in op_rows} == {"sdpa", "triton", "chunked", "alibi", "t5",
                                            "alibi_flex", "t5_flex"}
    assert {r["gates"] for r in op_rows} == {"dense", "sparse"}
    # FlexAttention has no backward on CPU: its rows say so.
    assert {r.get("error") for r in op_rows if r["impl"].endswith("_flex")} == {
        "no backward on cpu"}
    assert stages["op"]["not_available"] == []
    assert stages["train"]["not_available"] == []
    train_rows = stages["train"]["results"][0]["rows"]
    assert any(r["pe"].startswith("rope:fusion.") for r in train_rows)
    assert all("tokens_per_s" in r and "peak_mb" in r for r in train_rows), train_rows
    assert all(r["within"] for r in stages["memory"]["results"][0]["rows"])
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


PYTEST_OUTPUT = """\
tests/test_gpu.py::test_a[fp32] PASSED                                   [ 25%]
tests/test_gpu.py::test_a[bf16] FAILED                                   [ 50%]
tests/test_gpu.py::test_b SKIPPED (needs two GPUs)                       [ 75%]
tests/test_gpu.py::test_c """


XDIST_OUTPUT = """tests/test_gpu.py::test_d[x] 
tests/test_gpu.py::test_e 
[gw1] [ 50%] PASSED tests/test_gpu.py::test_e 
[gw0] [100%] PASSED tests/test_gpu.py::test_d[x] 
===== 2 passed in 9.1s =====
"""


def test_pytest_output_gives_outcomes_failures_and_the_test_a_crash_ended_in():
    """Serial and xdist output; two sessions' summaries add up."""
    got = pytest_outcomes(PYTEST_OUTPUT)
    assert got["tests"] == {"tests/test_gpu.py::test_a[fp32]": "passed",
                            "tests/test_gpu.py::test_a[bf16]": "failed",
                            "tests/test_gpu.py::test_b": "skipped"}
    assert got["failed"] == ["tests/test_gpu.py::test_a[bf16]"]
    assert got["unfinished"] == ["tests/test_gpu.py::test_c"]
    finished = pytest_outcomes(PYTEST_OUTPUT.replace("test_c ", "test_c PASSED") +
                               "\n===== 1 failed, 2 passed, 1 skipped in 3.2s =====\n"
                               + XDIST_OUTPUT)
    assert finished["unfinished"] == []
    assert finished["counts"] == {"failed": 1, "passed": 4, "skipped": 1}
    assert finished["tests"]["tests/test_gpu.py::test_d[x]"] == "passed"



def test_a_cut_stage_a_reports_the_training_tests_left_in_their_own_file(tmp_path):
    """Stage a's training tests run beside its kernel tests into a file of their own, which
    a cut leaves in OUT: the JSON reads both, the unfinished training test included."""
    (tmp_path / "gpu_tests.txt").write_text(PYTEST_OUTPUT.replace("test_c ", "test_c PASSED"))
    (tmp_path / TRAINING_TESTS).write_text(XDIST_OUTPUT.split("[gw1]")[0])
    _, record = stage_record(["a", "tests", "cut", "124", "140.2", "140", "gpu_tests.txt", ""],
                      tmp_path)
    got = record["results"]
    assert got["tests"]["tests/test_gpu.py::test_a[bf16]"] == "failed"
    assert got["unfinished"] == ["tests/test_gpu.py::test_d[x]", "tests/test_gpu.py::test_e"]
