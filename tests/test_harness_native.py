"""``eval.harness_model=native``: lm-evaluation-harness over our Megatron model gives the
exported model's harness results (the HF backend on the export) on local tasks of each
request type: loglikelihoods to 1e-4 with the same greedy flags, rolling loglikelihoods
over several windows, greedy generations equal, at one process and at TP=2 and CP=2;
``eval`` runs it end to end."""

import json
from pathlib import Path

import pytest
import torch

from cope_megatron.config import load_config
from tests.helpers import debug_overrides, forked_ranks, local_task_yaml

pytest.importorskip("lm_eval")

CHOICE = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - metric: word_perplexity
"""
GENERATE = """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]
TRAIN = {"train.steps": 3, "model.pe": "cope", "eval.length_multipliers": "[1]",
         "eval.passkey_samples": 0}


def write_tasks(root, words: list[str], model_dir) -> None:
    """Three local tasks over the corpus' words (offline); each question's first choice
    is the exported model's greedy continuation, so that greedy flags are compared too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)

    def greedy(text: str) -> str:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        whole = tokenizer.decode(out[0], skip_special_tokens=True)
        return whole[len(tokenizer.decode(ids[0])):]  # with its leading space, if any

    root.mkdir()
    questions = [" ".join(words[i:i + 5 + i % 4]).capitalize() for i in range(6)]
    docs = [{"question": q, "choices": [greedy(q), " " + " ".join(words[i + 10:i + 13])],
             "answer": i % 2, "page": " ".join(words[3 * i:3 * i + 40 + 7 * i]) + "."}
            for i, q in enumerate(questions)]
    (root / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, text in zip(TASKS, (CHOICE, ROLLING, GENERATE)):
        (root / f"{name}.yaml").write_text(local_task_yaml(name, root / "tiny.jsonl", text))


def responses(out: dict) -> dict:
    """{task: [each document's responses, in document order]}."""
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in out["samples"].items()}


def native_responses(args: list[str], include: str, out: str) -> None:
    """One rank: the harness's responses on our model restored at the layout ``args``
    name, as ``eval`` builds it; rank 0 writes them to ``out``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cope_megatron.distributed.parallel import destroy_distributed, world_size_from_env
    from cope_megatron.eval.context import EvalContext
    from cope_megatron.eval.harness_native import NativeLM
    from cope_megatron.model.gpt import eval_mode
    from cope_megatron.startup import check
    from cope_megatron.trainer import start
    from cope_megatron.training.engine import restore

    cfg = load_config(args)
    pe = check(cfg, world_size_from_env())
    env, manifest = start(cfg)
    try:
        engine, _ = restore(cfg, pe, env, manifest)
        ctx = EvalContext.of_run(cfg, engine, manifest, env.device, env.dp_rank, env.dp_size)
        lm = NativeLM(ctx, batch_size=4, max_length=cfg.model.seq_length)
        with eval_mode(engine):
            if env.rank:
                lm.serve()
                return
            try:
                result = lm_eval.simple_evaluate(model=lm, tasks=TASKS, log_samples=True,
                                                 task_manager=TaskManager(include_path=include))
            finally:
                lm.release()
        with open(out, "w") as f:
            json.dump(responses(result), f)
    finally:
        destroy_distributed()


def export_responses(run_dir: str, include: str, out: str) -> None:
    """The HF backend's responses and results on the run's export (a process of its own:
    the backend's ``accelerate`` starts a process group when it finds one set up)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cope_megatron.hf.harness import exported

    # batch size 1: the HF backend left-pads generation batches, which the export refuses
    result = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={exported(Path(run_dir), TRAIN['train.steps'])},"
        "trust_remote_code=True,dtype=float32", tasks=TASKS, batch_size=1, device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=include))
    with open(out, "w") as f:
        json.dump({"responses": responses(result), "results": result["results"]}, f,
                  default=str)


def make_reference(prepared, root, *layout: str) -> tuple:
    """A 3-step CoPE run (on two ranks at ``layout``, if given), its export and the HF
    backend's responses and results on the local tasks."""
    from cope_megatron.hf.export import export
    from tests.helpers import cli_in_ranks, train_here

    shards, _, corpus = prepared
    if layout:
        cli_in_ranks(2, ["train", *debug_overrides(shards, root / "run", **TRAIN), *layout])
    else:
        train_here(shards, root / "run", **TRAIN)
    export(root / "run", root / "run" / "hf")
    write_tasks(root / "tasks", (corpus / "doc000.txt").read_text().split(),
                root / "run" / "hf")
    forked_ranks(1, export_responses, str(root / "run"), str(root / "tasks"),
                 str(root / "export.json"))
    ref = json.loads((root / "export.json").read_text())
    return root, ref["responses"], ref["results"]


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    return make_reference(prepared, tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def tp2_reference(prepared, tmp_path_factory):
    """A run trained at TP=2 (restoring a checkpoint at another TP size is not supported)."""
    return make_reference(prepared, tmp_path_factory.mktemp("native_tp2"), "parallel.tensor=2")


def assert_same(got: dict, want: dict) -> None:
    for task in TASKS:
        assert len(got[task]) == len(want[task]) == 6, task
    flags = []
    for doc, (g, w) in enumerate(zip(got["tiny_choice"], want["tiny_choice"])):
        for [(lp, greedy)], [(lp_ref, greedy_ref)] in zip(g, w, strict=True):
            assert abs(lp - lp_ref) <= 1e-4, (doc, lp, lp_ref)
            assert greedy == greedy_ref, doc
            flags.append(greedy)
    assert True in flags and False in flags
    for [[g]], [[w]] in zip(got["tiny_rolling"], want["tiny_rolling"]):
        assert abs(g - w) <= 1e-4, (g, w)
    assert got["tiny_generate"] == want["tiny_generate"]
    assert any(r[0][0] for r in got["tiny_generate"])  # something was generated


def run_layout(reference, tmp_path, world: int, *layout: str) -> dict:
    """The native responses with ``world`` ranks at ``layout``."""
    root = reference[0]
    shards = load_config([str(root / "run" / "config.yaml")]).data.shards
    args = [*debug_overrides(shards, root / "run", **TRAIN), *layout]
    out = tmp_path / "native.json"
    forked_ranks(world, native_responses, args, str(root / "tasks"), str(out))
    return json.loads(out.read_text())


def test_native_harness_equals_the_exports_at_one_process(reference, tmp_path):
    assert_same(run_layout(reference, tmp_path, 1), reference[1])


@pytest.mark.slow
@pytest.mark.parametrize("run, layout", [
    ("tp2_reference", ["parallel.tensor=2"]),
    ("reference", ["parallel.context=2"]),
    ("reference", []),  # two data-parallel replicas share the requests
], ids=["tp2", "cp2", "dp2"])
def test_native_harness_equals_the_exports_on_two_ranks(request, tmp_path, run, layout):
    reference = request.getfixturevalue(run)
    assert_same(run_layout(reference, tmp_path, 2, *layout), reference[1])


@pytest.mark.slow
@pytest.mark.integration
def test_eval_runs_the_native_harness(reference, dist_cleanup):
    """``eval`` with eval.harness_model=native: the export's scores, in eval.json."""
    from cope_megatron.train import run_eval

    root, _, results = reference
    shards = load_config([str(root / "run" / "config.yaml")]).data.shards
    args = debug_overrides(shards, root / "run", **TRAIN)
    report = run_eval(load_config([*args, f"eval.harness_include={root / 'tasks'}",
                                   "eval.harness_tasks=[tiny_choice]",
                                   "eval.harness_model=native"]))
    scores = report["harness"]["tasks"]
    assert scores["tiny_choice"]["acc,none"] == results["tiny_choice"]["acc,none"]
    saved = json.loads((root / "run" / "eval.json").read_text())
    assert saved["harness"]["tasks"] == scores


def test_a_length_the_pe_cannot_hold_is_refused(dist_cleanup):
    from cope_megatron.config import ConfigError
    from cope_megatron.eval.context import EvalContext
    from cope_megatron.eval.harness_native import NativeLM
    from tests.helpers import tiny_gpt

    model = tiny_gpt()
    model.max_positions = 16  # as a learned-position model of 16 tokens has
    ctx = EvalContext(model=model, manifest={}, shards="", verify="never", train_length=16,
                      pe="learned", device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="eval.harness_max_length"):
        NativeLM(ctx, batch_size=1, max_length=32)


def test_harness_settings_are_validated():
    from cope_megatron.config import ConfigError
    from cope_megatron.config.validation import validate

    with pytest.raises(ConfigError, match="eval.harness_max_length"):
        validate(load_config(["eval.harness_max_length=0"]))
    with pytest.raises(ConfigError, match="eval.harness_model"):
        load_config(["eval.harness_model=remote"])
