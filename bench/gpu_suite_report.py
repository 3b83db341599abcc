"""gpu_suite.json for bench/gpu_suite.sh: the machine, and each stage's status, time and
results, gathered from the stage's table file.

    python bench/gpu_suite_report.py probe > ENV_JSON        # once, at the start
    python bench/gpu_suite_report.py write ENV_JSON RECORDS OUT_DIR

``RECORDS`` holds one tab-separated line per finished stage, as the suite writes it:
letter, name, status, exit code, elapsed seconds, budget seconds, table file, and the
variants not available (``;``-separated). ``write`` runs after every stage, so a suite cut
short by the device's own limit still leaves the JSON of what finished; it imports no
torch, so it costs nothing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

OUTCOMES = "PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS"
TEST_LINE = re.compile(rf"^(tests/\S+::\S+)(?: ({OUTCOMES})\b)?")
"""pytest -v: the test's name when it starts, its outcome after it on the same line."""
WORKER_LINE = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] ({OUTCOMES}) (tests/\S+::\S+)")
"""pytest -v under xdist: the outcome on a line of its own."""
TRAINING_TESTS = "gpu_tests_training.txt"
"""Stage a's training tests, run beside its kernel tests and appended to its table when
both end; a cut leaves the file."""
SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def probe() -> dict:
    """The machine and the versions the figures come from."""
    try:
        import torch
    except ImportError as e:  # the stages will say more; the JSON is still written
        return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": None, "torch": None, "error": str(e),
                "python": platform.python_version(), "dry": os.environ.get("GPU_SUITE_DRY") == "1"}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "device_count": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "dry": os.environ.get("GPU_SUITE_DRY") == "1"}


def pytest_outcomes(text: str) -> dict:
    """Per-test outcomes of ``pytest -v`` output (one or more sessions, xdist's too), the
    summary counts summed, and the tests that started and never ended: the one a crash
    ended in, or those a cut stopped."""
    outcomes, started = {}, []
    for line in text.splitlines():
        if match := WORKER_LINE.match(line):
            outcome, test = match.groups()
        elif match := TEST_LINE.match(line):
            test, outcome = match.groups()
            started.append(test)
        else:
            continue
        if outcome:
            outcomes[test] = outcome.lower()
    counts = {}
    for line in text.splitlines():
        if line.startswith("=") and " in " in line:
            for n, kind in SUMMARY_COUNT.findall(line):
                counts[kind] = counts.get(kind, 0) + int(n)
    return {"tests": outcomes, "counts": counts,
            "unfinished": [t for t in started if t not in outcomes],
            "failed": sorted(t for t, o in outcomes.items() if o in ("failed", "error"))}


def json_lines(text: str) -> list:
    """The JSON line each benchmark prints last (one per invocation in the stage)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def stage(fields: list[str], out: Path) -> tuple[str, dict]:
    letter, name, status, rc, elapsed, budget, table, missing = fields
    record = {"stage": letter, "status": status, "exit_code": int(rc),
              "elapsed_s": float(elapsed), "budget_s": float(budget), "table": table or None,
              "not_available": [m for m in missing.split(";") if m]}
    paths = [out / table] if table else []
    if name == "tests":  # the training tests' own file, left where the stage was cut
        paths.append(out / TRAINING_TESTS)
    texts = [p.read_text(errors="replace") for p in paths if p.is_file()]
    if texts:
        text = "\n".join(texts)
        record["results"] = pytest_outcomes(text) if name == "tests" else json_lines(text)
    return name, record


def write(env_file: Path, records: Path, out: Path) -> None:
    env = json.loads(env_file.read_text())
    stages = dict(stage(line.split("\t"), out)
                  for line in records.read_text().splitlines() if line.strip())
    summary = {**env, "elapsed_s": round(sum(s["elapsed_s"] for s in stages.values()), 1),
               "ok": all(s["status"] in ("ok", "skipped") for s in stages.values()),
               "stages": stages}
    tmp = out / "gpu_suite.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "gpu_suite.json")


def main() -> None:
    if sys.argv[1:2] == ["probe"]:
        print(json.dumps(probe()))
    elif sys.argv[1:2] == ["write"] and len(sys.argv) == 5:
        write(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
