"""``cope-megatron export``: for every PE, a 2-step debug checkpoint loads with
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` and gives our model's
logits (fp32, 1e-5) at the training length and at 2× where the PE extrapolates; greedy
generation equals ours; the tokenizer round-trips as the SentencePiece model does; a TP=2
checkpoint exports to the model that TP=1 trains."""

import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

from cope_megatron.config import load_config
from cope_megatron.pe import REGISTRY, model_pe
from tests.helpers import Ours, cli_in_ranks, debug_overrides, local_task_yaml

transformers = pytest.importorskip("transformers")

VARIANTS = {pe: {"model.pe": pe} for pe in sorted(REGISTRY)}
VARIANTS["cope_per_head"] = {"model.pe": "cope", "pe.cope.shared_table": "false"}
VARIANTS["schedule"] = {"model.pe": "cope", "model.pe_schedule": "[rope,cope]"}
VARIANTS["length_scale"] = {"model.pe": "rope", "pe.length_scale.type": "learned"}
VARIANTS["gqa_rmsnorm_untied"] = {"model.pe": "cope_rope", "model.num_query_groups": 2,
                                  "model.normalization": "RMSNorm",
                                  "model.untie_embeddings": "true"}


def export_run(run_dir, out_dir) -> None:
    """Export in this process (the command itself: ``export`` below)."""
    from cope_megatron.hf.export import export as export_in_process

    export_in_process(run_dir, out_dir)


def export(run_dir, out_dir) -> None:
    """``cope-megatron export`` as a command."""
    out = subprocess.run([sys.executable, "-m", "cope_megatron", "export", str(run_dir),
                          str(out_dir)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]


def load_hf(out_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_model_computes_ours(prepared, tmp_path, dist_cleanup, variant):
    from cope_megatron.train import run_train

    shards, manifest, _ = prepared
    cfg = load_config(debug_overrides(shards, tmp_path / "run", **{
        "train.steps": 2, **VARIANTS[variant]}))
    run_train(cfg, evaluate_after=False)
    export_run(tmp_path / "run", tmp_path / "hf")
    hf, ours = load_hf(tmp_path / "hf"), Ours(tmp_path / "run")
    # Standard architectures where one computes our function (hf/standard.py).
    assert hf.config.model_type == {"rope": "gpt_neox", "learned": "gpt2"}.get(
        variant, "cope_megatron")

    gen = torch.Generator().manual_seed(0)
    seq = cfg.model.seq_length
    lengths = [seq, 2 * seq] if model_pe(cfg.model).extrapolates else [seq]
    for length in lengths:
        tokens = torch.randint(0, manifest["vocab_size"], (2, length), generator=gen)
        with torch.no_grad():
            got = hf(input_ids=tokens).logits
        torch.testing.assert_close(got, ours.logits(tokens), rtol=1e-5, atol=1e-5)

    prompt = torch.randint(0, manifest["vocab_size"], (1, 8), generator=gen)
    generated = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False,
                            eos_token_id=None, pad_token_id=0)
    assert torch.equal(generated, ours.greedy(prompt, 20))


def test_tokenizer_round_trips_as_sentencepiece(prepared, tmp_path, dist_cleanup):
    from transformers import AutoTokenizer

    from cope_megatron.train import run_train

    shards, _, _ = prepared
    run_train(load_config(debug_overrides(shards, tmp_path / "run", **{"train.steps": 1})),
              evaluate_after=False)
    export_run(tmp_path / "run", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=str(shards / "tokenizer.model"))
    for text in ["Another know while last might us great old year.",
                 "  spaces  and\nnewlines, digits 12345 and unknown ∑ symbols ✓"]:
        ids = tokenizer.encode(text)
        assert ids == sp.encode(text)
        assert tokenizer.decode(ids) == sp.decode(ids)


@pytest.mark.integration
def test_tensor_parallel_checkpoint_exports_the_model_tp1_trains(prepared, tmp_path):
    """The same seed trains the same model under TP=1 and TP=2 (to round-off): their
    exports hold the same weights, gathered from the two TP shards. Adam turns round-off
    in near-zero gradients (the key bias's) into steps of up to lr, hence an absolute
    1e-4 after one step at lr 3e-3, far below what a misplaced shard gives (weights ~5e-2)."""
    from safetensors.torch import load_file

    shards, _, _ = prepared
    for name, ranks, extra in (("tp1", 1, {}), ("tp2", 2, {"parallel.tensor": 2})):
        args = debug_overrides(shards, tmp_path / name, **{
            "train.steps": 1, "model.pe": "cope", "pe.cope.shared_table": "false", **extra})
        cli_in_ranks(ranks, ["train", *args])
    export_run(tmp_path / "tp1", tmp_path / "hf_tp1")
    export(tmp_path / "tp2", tmp_path / "hf_tp2")  # the command, as a process
    one, two = (load_file(tmp_path / f"hf_{n}" / "model.safetensors") for n in ("tp1", "tp2"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-4, msg=key)


TINY_TASK = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""


@pytest.mark.integration
def test_local_harness_task_runs_offline_and_reaches_the_report(prepared, tmp_path, capsys,
                                                                dist_cleanup):
    """A tiny local lm-evaluation-harness task on the exported model, offline, through
    ``eval``; an unknown task is one clear error."""
    import json

    pytest.importorskip("lm_eval")
    from cope_megatron.cli import main as cli
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.report import write_report
    from cope_megatron.train import run_eval, run_train

    shards, _, _ = prepared
    args = debug_overrides(shards, tmp_path / "run", **{
        "train.steps": 2, "eval.length_multipliers": "[1]", "eval.passkey_samples": 0})
    run_train(load_config(args), evaluate_after=False)
    destroy_distributed()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"question": f"Word {i}: another know while", "choices": ["last", "great old"],
             "answer": i % 2} for i in range(6)]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny_local.yaml").write_text(local_task_yaml("tiny_local", tasks / "tiny.jsonl",
                                                            TINY_TASK))
    args.append(f"eval.harness_include={tasks}")

    report = run_eval(load_config([*args, "eval.harness_tasks=[tiny_local]"]))
    destroy_distributed()
    scores = report["harness"]["tasks"]["tiny_local"]
    assert 0 <= scores["acc,none"] <= 1
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["harness"]["tasks"]["tiny_local"] == scores and "lengths" in saved
    written = write_report([tmp_path / "run"], tmp_path / "report").read_text()
    assert "tiny_local acc,none" in written

    capsys.readouterr()
    kept = (tmp_path / "run" / "eval.json").read_text()
    assert cli(["eval", *args, "eval.harness_tasks=[no_such_task]"]) == 2
    assert "are not lm-evaluation-harness tasks" in capsys.readouterr().err
    assert (tmp_path / "run" / "eval.json").read_text() == kept  # refused before evaluating


@pytest.mark.slow
def test_a_registry_task_in_an_offline_process_says_it_needs_a_download(prepared, tmp_path,
                                                                        dist_cleanup):
    """``cope-megatron eval`` as a command (the HF offline variables are read at import),
    asked for a task whose data lives on the Hub."""
    pytest.importorskip("lm_eval")
    from cope_megatron.train import run_train

    shards, _, _ = prepared
    args = debug_overrides(shards, tmp_path / "run", **{
        "train.steps": 2, "eval.length_multipliers": "[1]", "eval.passkey_samples": 0})
    run_train(load_config(args), evaluate_after=False)
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "OMP_NUM_THREADS": "1"}
    registry = subprocess.run([sys.executable, "-m", "cope_megatron", "eval", "--json", *args,
                               "eval.harness_tasks=[lambada_openai]"], capture_output=True,
                              text=True, timeout=600, env=offline)
    assert registry.returncode == 2 and "download from the Hugging Face Hub" in registry.stderr


def test_zero3_checkpoint_exports_the_same_model(prepared, tmp_path, dist_cleanup):
    """ZeRO-3 partitions the weights themselves: gathered, they equal a ZeRO-0 run's."""
    from safetensors.torch import load_file

    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.train import run_train

    shards, _, _ = prepared
    for stage in (0, 3):
        run = tmp_path / f"z{stage}"
        run_train(load_config(debug_overrides(shards, run, **{
            "train.steps": 1, "zero.stage": stage, "model.pe": "cope"})), evaluate_after=False)
        destroy_distributed()
        export_run(run, tmp_path / f"hf{stage}")
    zero0, zero3 = (load_file(tmp_path / f"hf{s}" / "model.safetensors") for s in (0, 3))
    assert zero0.keys() == zero3.keys()
    for key in zero0:
        torch.testing.assert_close(zero3[key], zero0[key], rtol=0, atol=1e-6, msg=key)
