"""Perplexity against length: the window plans, equal scored tokens at every length, both
protocols, clean JSON on stdout, and biased attention whose memory is linear in length."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from cope_megatron.config import load_config
from cope_megatron.eval.perplexity import window_plan
from cope_megatron.train import run_eval, run_train
from tests.conftest import debug_overrides


@pytest.mark.parametrize("n, length, stride", [(64, 16, 16), (64, 16, 4), (96, 32, 8),
                                               (32, 32, 1)])
def test_window_plan_scores_every_token_once(n, length, stride):
    scored = []
    for begin, first in window_plan(n, length, stride):
        assert begin + length <= n
        assert first == 0 or length - first == stride  # later windows: their new tokens
        scored += range(begin + first, begin + length)
    assert scored == list(range(n))


def test_eval_scores_the_same_tokens_at_every_length(prepared, tmp_path, dist_cleanup):
    shards, _, _ = prepared
    overrides = debug_overrides(shards, tmp_path / "run", **{
        "train.steps": 2, "eval.length_multipliers": "[1, 2, 4]", "eval.tokens": 200})
    run_train(load_config(overrides), evaluate_after=False)
    from cope_megatron.distributed.parallel import destroy_distributed

    destroy_distributed()
    report = run_eval(load_config(overrides))
    results = [*report["lengths"].values(), *report["sliding"].values()]
    assert set(report["lengths"]) == set(report["sliding"]) == {32, 64, 128}
    assert {r["tokens"] for r in results} == {256}  # 200 rounded up to whole 128-windows
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in results)
    # At the training length the sliding window (stride = training length) is the same run.
    assert report["sliding"][32]["loss"] == pytest.approx(report["lengths"][32]["loss"],
                                                          rel=1e-6)
    # At 4x, sliding gives each token more context than cutting the text does.
    assert report["sliding"][128]["loss"] != report["lengths"][128]["loss"]


def test_cli_eval_json_keeps_stdout_clean(prepared, tmp_path):
    shards, _, _ = prepared
    overrides = debug_overrides(shards, tmp_path / "run", **{"train.steps": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["train"], ["eval", "--json"]):
        out = subprocess.run([sys.executable, "-m", "cope_megatron", *command, *overrides],
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)  # nothing but the report
    assert report["step"] == 1 and set(report["lengths"]) == {"32", "64"}
    assert out.stderr  # the logs went there


MEMORY_CHILD = textwrap.dedent("""
    import resource, sys, torch
    from cope_megatron.config import PEConfig
    from cope_megatron.pe.alibi import AlibiAttention
    from cope_megatron.pe.base import AttentionShape
    resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))
    s, h = 16384, 4  # a [h, s, s] fp32 bias alone is 4 GiB
    shape = AttentionShape(num_heads=h, num_kv_heads=h, head_dim=8, total_heads=h,
                           head_offset=0, softmax_scale=0.35, dropout=0.0, train_length=128,
                           init_std=0.02)
    attn = AlibiAttention(shape, PEConfig())
    q, k, v = (torch.randn(1, h, s, 8) for _ in range(3))
    if sys.argv[1] == "eval":
        with torch.no_grad():
            print(torch.isfinite(attn(q, k, v)).all().item())
    else:
        attn(q, k, v)
""")


def test_alibi_evaluation_beyond_an_s_by_s_bias_fits(tmp_path):
    """Under a 2 GiB data limit, ALiBi evaluates 16k tokens (its [s, s] bias would be 4 GiB);
    the training path, which builds that bias, cannot."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = [sys.executable, "-c", MEMORY_CHILD]
    ok = subprocess.run(run + ["eval"], capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0 and ok.stdout.strip() == "True", ok.stderr[-2000:]
    oom = subprocess.run(run + ["train"], capture_output=True, text=True, env=env, timeout=600)
    assert oom.returncode != 0 and "memory" in oom.stderr.lower(), oom.stderr[-2000:]
