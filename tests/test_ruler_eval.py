"""The long-context suite inside ``eval``: its report (rows not applicable with reasons,
scores, effective length, cost), scoring against models whose answers are known, loss
against position agreeing with the perplexity it refines, and the same numbers under
CP × TP as in one process."""

from __future__ import annotations

import math

import pytest
import torch

from cope_megatron.config import load_config
from cope_megatron.train import run_eval
from tests.helpers import debug_overrides, forked_ranks, train_here

RULER = {"eval.ruler.tasks": "[niah_single_number, vt, fwe]",
         "eval.ruler.length_multipliers": "[1, 8, 16]", "eval.ruler.depths": "[0.0, 1.0]",
         "eval.ruler.samples": 2, "eval.position_loss": "true", "eval.passkey_samples": 0}


def test_eval_reports_the_suite_and_loss_against_position(prepared, tmp_path, dist_cleanup):
    shards, _, _ = prepared
    train_here(shards, tmp_path / "run", **{"train.steps": 2})
    report = run_eval(load_config(debug_overrides(shards, tmp_path / "run", **RULER)))
    ruler = report["ruler"]
    assert ruler["haystack"].startswith("evaluation text") and ruler["train_length"] == 32
    rows = ruler["tasks"]
    for task, per_length in rows.items():
        assert per_length[32]["status"] == "not applicable"  # no prompt fits 32 tokens
        assert "more than 32" in per_length[32]["reason"], task
    assert rows["vt"][256]["status"] == "not applicable"
    for task, row in [(t, rows[t][512]) for t in rows] + [("niah_single_number",
                                                           rows["niah_single_number"][256])]:
        assert row["samples"] == 2
        assert set(row["depths"]) == ({"all"} if task == "fwe" else {"0.0", "1.0"}), task
        for scores in row["depths"].values():
            assert 0 <= scores["teacher_forced"] <= scores["greedy"] <= 1  # TF exact ⇒ found
    assert ruler["average"]["greedy"][32] is None and ruler["average"]["greedy"][256] is None
    assert ruler["average"]["greedy"][512] is not None
    assert ruler["effective_length"]["teacher_forced"]["all"]["status"] == "not applicable"
    # Each batch (2 samples) read at least once: samples × depths × tasks, times forwards.
    assert ruler["cost"][512]["tokens_read"] >= 512 * 2 * (2 + 2 + 1)
    assert ruler["cost"][32]["tokens_read"] == 0
    # Loss against position refines the windows protocol's perplexity: the same tokens.
    curves = report["position_loss"]
    for length in (32, 64):
        curve = curves[length]
        assert curve["bin_width"] == 1 and len(curve["loss"]) == length
        assert sum(curve["loss"]) / length == pytest.approx(report["lengths"][length]["loss"],
                                                            rel=1e-6)
        assert curve["last_k"] == 32 and curve["windows"] == 256 // length
        assert curve["last_k_loss"] == pytest.approx(sum(curve["loss"][-32:]) / 32)
        assert curve["last_k_ppl"] == pytest.approx(math.exp(curve["last_k_loss"]))


class Answering(torch.nn.Module):
    """Logits [b, s, vocab] that put the next token of ``gold`` [b, s + 1] first, whatever
    the input, except at ``wrong`` (a set of positions), where they put ``gold`` + 1."""

    def __init__(self, gold: torch.Tensor, vocab: int, wrong: set[int] = frozenset()):
        super().__init__()
        self.gold, self.vocab, self.wrong = gold, vocab, wrong

    def forward(self, input_ids, position_ids, attention_mask):
        target = self.gold[:, 1:].clone()
        for p in self.wrong:
            target[:, p] = (target[:, p] + 1) % self.vocab
        return torch.nn.functional.one_hot(target, self.vocab).float()


def test_scores_of_models_with_known_answers(prepared, dist_cleanup):
    from cope_megatron.data.tokenizer import dataset_tokenizer
    from cope_megatron.distributed.parallel import init_distributed
    from cope_megatron.eval.context import EvalContext
    from cope_megatron.eval.ruler.prompt import Encoder, Haystack
    from cope_megatron.eval.ruler.scoring import score_samples
    from cope_megatron.eval.ruler.tasks import generate

    shards, manifest, _ = prepared
    tok = dataset_tokenizer(shards, manifest)
    init_distributed(1)
    sample = generate("niah_multivalue", seed=0, tokenizer=tok, length=640, depth=0.5,
                      haystack=Haystack.noise(tok))
    gold = torch.tensor([sample.tokens])
    methods = ["teacher_forced", "greedy"]

    def scores(wrong):
        model = Answering(gold, tok.vocab_size, wrong)
        ctx = EvalContext(model=model, manifest=manifest, shards=str(shards), verify="never",
                          train_length=32, pe="oracle", device=torch.device("cpu"))
        return score_samples(ctx, [sample], methods, 1, Encoder(tok))[0]

    assert scores(set()) == {"teacher_forced": 1.0, "greedy": 1.0}
    # The last value's last token wrong: not exact, but 3 of the 4 values are generated.
    assert scores({639}) == {"teacher_forced": 0.0, "greedy": 0.75}
    # The first answer token wrong: the model then follows its own (wrong) prefix.
    first = 640 - sample.answer
    assert scores({first})["teacher_forced"] == 0.0 and scores({first})["greedy"] < 1.0


def _layout_worker(layout: list[str], out: str) -> None:
    """One rank: greedy answers and position losses of a seeded CoPE model."""
    import torch.distributed as dist

    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.eval.context import EvalContext
    from cope_megatron.eval.position_loss import position_sums
    from cope_megatron.eval.ruler.decode import greedy
    from cope_megatron.model.gpt import build_gpt
    from cope_megatron.pe import model_pe

    cfg = load_config(["model.num_layers=2", "model.hidden_size=32", "model.pe=cope",
                       "model.num_attention_heads=4", "model.seq_length=32",
                       "model.init_method_std=0.5", *layout])
    env = init_distributed(cfg.parallel.tensor, cfg.parallel.context)
    seed_everything(3)
    model = build_gpt(cfg, model_pe(cfg.model), 128).eval()
    tokens = torch.randint(0, 100, (3, 65), generator=torch.Generator().manual_seed(1))
    ctx = EvalContext(model=model, manifest={}, shards="", verify="never", train_length=32,
                      pe="cope", device=env.device, dp_rank=env.dp_rank, dp_size=env.dp_size)
    with torch.no_grad():
        first, _, _ = greedy(model, tokens, 6)
        tokens[0, -6:] = first[0]  # right throughout, right for 3 tokens, wrong at once
        tokens[1, -6:-3] = first[1, :3]
        generated, forced, _ = greedy(model, tokens, 6)
        sums = position_sums(ctx, tokens.reshape(-1)[:129], 64, 1)
    if dist.get_rank() == 0:
        torch.save({"generated": generated, "forced": forced, "sums": sums}, out)


@pytest.mark.integration
def test_greedy_answers_and_position_losses_are_the_same_under_cp2_tp2(tmp_path, dist_cleanup):
    forked_ranks(1, _layout_worker, [], str(tmp_path / "one.pt"))
    forked_ranks(4, _layout_worker, ["parallel.tensor=2", "parallel.context=2"],
                 str(tmp_path / "four.pt"))
    one, four = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "four"))
    assert torch.equal(one["generated"], four["generated"])
    assert torch.equal(one["forced"], four["forced"])
    assert one["forced"][0].all() and one["forced"][1, :3].all() and one["generated"].max() >= 64
    torch.testing.assert_close(one["sums"], four["sums"], rtol=1e-5, atol=1e-5)
