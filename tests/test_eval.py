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
from tests.helpers import debug_overrides


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
    assert set(report["passkey"]) == {32, 64, 128}
    for result in report["passkey"].values():
        accuracies = [v for k, v in result.items() if k != "samples"]
        assert result.get("status") == "not applicable" or (
            len(accuracies) == 5 and all(0 <= a <= 1 for a in accuracies)), result


def test_eval_scores_raw_text_files_with_the_runs_tokenizer(prepared, tmp_path, dist_cleanup):
    from cope_megatron.config import ConfigError
    from cope_megatron.distributed.parallel import destroy_distributed

    shards, _, corpus = prepared
    overrides = debug_overrides(shards, tmp_path / "run", **{"train.steps": 1,
                                                              "eval.passkey_samples": 0})
    run_train(load_config(overrides), evaluate_after=False)
    destroy_distributed()
    report = run_eval(load_config(overrides + [f"eval.data={corpus}/doc00*.txt"]))
    assert report["eval_data"].endswith("doc00*.txt")
    assert {r["tokens"] for r in report["lengths"].values()} == {256}
    assert all(math.isfinite(r["ppl"]) for r in report["sliding"].values())
    destroy_distributed()
    short = tmp_path / "short.txt"
    short.write_text("too short to score")
    with pytest.raises(ConfigError, match="eval.tokens:.*short.txt holds fewer"):
        run_eval(load_config(overrides + [f"eval.data={short}"]))


@pytest.mark.integration
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
    import resource, torch
    from cope_megatron.config import PEConfig
    from cope_megatron.pe.alibi import AlibiAttention
    from cope_megatron.pe.base import AttentionShape
    resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))
    s, h = 8192, 4  # a [h, s, s] fp32 bias alone is 1 GiB
    shape = AttentionShape(num_heads=h, num_kv_heads=h, head_dim=8, total_heads=h,
                           head_offset=0, softmax_scale=0.35, dropout=0.0,
                           init_std=0.02)
    attn = AlibiAttention(shape, PEConfig())
    q, k, v = (torch.randn(1, h, s, 8) for _ in range(3))
    with torch.no_grad():
        print("eval finite:", torch.isfinite(attn(q, k, v)).all().item())
    try:
        attn(q, k, v)
    except (RuntimeError, MemoryError) as e:  # the allocator's refusal, not a crash
        print("train:", "out of memory" if "memory" in str(e).lower() else repr(e))
""")


@pytest.mark.integration
def test_alibi_evaluation_beyond_an_s_by_s_bias_fits(tmp_path):
    """Under a 1 GiB data limit, ALiBi evaluates 8k tokens (its [s, s] bias alone is 1 GiB);
    the training path, which builds that bias, cannot."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True,
                           text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.splitlines() == ["eval finite: True", "train: out of memory"]


def test_passkey_prompt_hides_the_key_at_its_depth(prepared):
    import torch

    from cope_megatron.data.tokenizer import dataset_tokenizer
    from cope_megatron.eval.passkey import KEY, QUESTION, PromptTooLongError, passkey_sample

    shards, manifest, _ = prepared
    tok = dataset_tokenizer(shards, manifest)
    key_ids = tok.encode(KEY.format(key=54321))
    starts = []
    for depth in (0.0, 0.5, 1.0):
        tokens, mask = passkey_sample(tok, 256, depth, 54321)
        assert tokens.shape == (257,) and mask.shape == (256,)
        ids = tokens.tolist()
        starts.append(next(i for i in range(len(ids)) if ids[i:i + len(key_ids)] == key_ids))
        answer = tokens[1:][mask.bool()]  # the predictions the mask scores
        assert tok.decode(answer.tolist()).strip() == "54321"
        assert torch.equal(mask[-len(answer):], torch.ones(len(answer)))
        assert mask.sum() == len(answer)
        assert tok.decode(ids).rstrip().endswith(QUESTION + " 54321")
    assert starts[0] < starts[1] < starts[2]
    with pytest.raises(PromptTooLongError):
        passkey_sample(tok, 8, 0.5, 54321)


def test_answer_errors_is_teacher_forced_greedy_decoding(dist_cleanup):
    import torch

    from cope_megatron.eval.passkey import answer_errors
    from tests.helpers import tiny_gpt

    model = tiny_gpt()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (3, 17), generator=gen)
    with torch.no_grad():
        logits = model(tokens[:, :-1], torch.arange(16).expand(3, 16), None)
    # Make sample 0 right at its last position (its inputs stay as they were).
    tokens[0, -1] = logits[0, -1].argmax(-1)
    mask = torch.zeros(3, 16)
    mask[:, -3:] = 1
    want = ((logits.argmax(-1) != tokens[:, 1:]).float() * mask).sum(-1)
    with torch.no_grad():
        got = answer_errors(model, tokens, mask)
    assert got.tolist() == want.tolist() and want.sum() > 0
