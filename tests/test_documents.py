"""Document-aware attention (``data.document_boundaries``, cope_megatron/model/documents.py):
a packed sample of several documents gives every token the loss, and the parameters the
gradient, of its document run alone, for every PE, on one process and at CP=2 (boundaries
inside a rank's chunk, at chunk edges, and a document crossing ranks)."""

import json
import random

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.config import load_config
from cope_megatron.distributed.parallel import init_distributed, seed_everything
from cope_megatron.model.documents import document_starts
from cope_megatron.model.gpt import build_gpt, model_batch, token_losses
from cope_megatron.ops.context_parallel.ring import ChunkPair, Documents, Part, document_parts
from cope_megatron.pe import REGISTRY, model_pe
from tests.helpers import forked_ranks

VOCAB, EOS, SEQ = 128, 1, 32
BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.num_query_groups=2", f"model.seq_length={SEQ}", "pe.cope.npos_max=8",
        "data.document_boundaries=true", "train.seed=3"]
VARIANTS = {pe: [f"model.pe={pe}"] for pe in sorted(REGISTRY)}
VARIANTS["rope_length_scale"] = ["model.pe=rope", "pe.length_scale.type=learned"]
VARIANTS["fire_length_scale"] = ["model.pe=fire", "pe.length_scale.type=learned"]
VARIANTS["rope_yarn"] = ["model.pe=rope", "pe.rope_scaling.type=yarn",
                         "pe.rope_scaling.factor=2", "pe.rope_scaling.original_length=16"]
DOCUMENTS = ([8, 5, 11, 9],  # starts 0, 8, 13, 24: two at CP=2's chunk edges (8 tokens)
             [3, 17, 13])  # starts 0, 3, 20: the second crosses three chunks and both ranks


def packed_tokens() -> torch.Tensor:
    """[2, SEQ + 1]: each row its documents (random tokens, EOS last), the last one cut."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for lengths in DOCUMENTS:
        row = [torch.cat([torch.randint(2, VOCAB, (n - 1,), generator=gen),
                          torch.tensor([EOS])]) for n in lengths]
        rows.append(torch.cat(row)[:SEQ + 1])
    return torch.stack(rows)


def document_spans(lengths: list[int]) -> list[tuple[int, int]]:
    """(first, end) of each document's input tokens in a packed row."""
    ends = torch.tensor(lengths).cumsum(0).clamp(max=SEQ).tolist()
    return list(zip([0] + ends[:-1], ends))


def losses_and_grads(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses [b, s] over the whole sequence (gathered over CP ranks) and the
    gradient of their sum, all parameters flattened (summed over CP ranks)."""
    model.zero_grad(set_to_none=True)
    losses, _ = token_losses(model, tokens)
    losses.sum().backward()
    cp = parallel_state.get_context_parallel_group()
    full = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float64)
    full.scatter_(1, model_batch(model, tokens)["position_ids"], losses.detach().double())
    dist.all_reduce(full, group=cp)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    dist.all_reduce(grads, group=cp)
    return full, grads


def worker(out: str, context: int, variants: dict) -> None:
    results = {}
    for name, overrides in variants.items():
        cfg = load_config(BASE + overrides + [f"parallel.context={context}"])
        init_distributed(1, context)
        seed_everything(cfg.train.seed)
        model = build_gpt(cfg, model_pe(cfg.model), VOCAB, document_eos=EOS)
        tokens = packed_tokens()
        seen: dict = {}
        hook = model.decoder.register_forward_pre_hook(
            lambda _, args, kwargs, seen=seen: seen.update(kwargs), with_kwargs=True)
        packed, grads = losses_and_grads(model, tokens)
        hook.remove()
        result = {"packed": packed.tolist(), "grads": grads.tolist()}
        if seen.get("rotary_pos_emb") is not None:  # RoPE as the layers get it, [s, b, 1, d]
            result["rotary"] = seen["rotary_pos_emb"][:, :, 0].transpose(0, 1).tolist()
        if context == 1:  # each document alone, and the packed rows, with boundaries off
            model.document_eos = None  # the ordinary path: one document, positions 0…
            alone = torch.zeros_like(packed)
            alone_grads = torch.zeros_like(grads)
            for row, lengths in enumerate(DOCUMENTS):
                for a, e in document_spans(lengths):
                    losses, g = losses_and_grads(model, tokens[row:row + 1, a:e + 1])
                    alone[row, a:e] = losses[0]
                    alone_grads += g
            result |= {"alone": alone.tolist(), "alone_grads": alone_grads.tolist(),
                       "crossing": losses_and_grads(model, tokens)[0].tolist()}
        results[name] = result
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("documents")
    forked_ranks(1, worker, str(tmp / "cp1.json"), 1, VARIANTS)
    forked_ranks(2, worker, str(tmp / "cp2.json"), 2, VARIANTS)
    return {n: json.loads((tmp / f"cp{n}.json").read_text()) for n in (1, 2)}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_document_as_if_alone(runs, name):
    one = runs[1][name]
    alone, packed = torch.tensor(one["alone"]), torch.tensor(one["packed"])
    torch.testing.assert_close(packed, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(one["grads"]), torch.tensor(one["alone_grads"]),
                               atol=1e-5, rtol=1e-5)
    if "rotary" in one:  # RoPE restarts: each token rotated at its in-document position
        rotary = torch.tensor(one["rotary"])  # [b, s, d]: angles, 0 at position 0
        by_position = rotary[1, 3:20]  # the longest document: positions 0…16
        assert not by_position[0].any() and (by_position[1:, 0] > by_position[:-1, 0]).all()
        for row, lengths in enumerate(DOCUMENTS):
            for a, e in document_spans(lengths):
                assert torch.equal(rotary[row, a:e], by_position[:e - a])
    # The boundaries matter: across documents the losses differ.
    assert (torch.tensor(one["crossing"]) - alone).abs().max() > 1e-3
    cp2 = runs[2][name]
    torch.testing.assert_close(torch.tensor(cp2["packed"]), alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(cp2["grads"]), torch.tensor(one["alone_grads"]),
                               atol=1e-5, rtol=1e-5)


def test_dynamic_ntk_is_refused_with_document_boundaries():
    from cope_megatron.config import ConfigError
    from cope_megatron.pe import rope_scaling

    cfg = load_config(BASE + ["model.pe=rope", "pe.rope_scaling.type=dynamic"])
    with pytest.raises(ConfigError, match="pe.rope_scaling.type: dynamic NTK"):
        rope_scaling.check(cfg, model_pe(cfg.model))


def test_document_starts():
    tokens = torch.tensor([[5, EOS, 6, 7, EOS, EOS, 8], [EOS, 4, 4, 4, 4, 4, 4]])
    assert document_starts(tokens, EOS).tolist() == [[0, 0, 2, 2, 2, 5, 6],
                                                     [0, 1, 1, 1, 1, 1, 1]]
    docs = Documents.of(document_starts(tokens, EOS))
    assert docs.firsts == ((0, 2, 5, 6), (0, 1)) and docs.length == 7
    assert docs.ranges(0) == [(0, 2), (2, 5), (5, 6), (6, 7)] and docs.ranges(1) == [(0, 1),
                                                                                     (1, 7)]
    assert docs.runs(0, 1, 6) == [(0, 1), (2, 3), (5, 1)]  # the first document began before
    assert Documents.of(None) is None


def test_chunk_pair_parts():
    # Chunks of 4; documents start at 0, 3 and 9 (global): chunk 2 (8…11) holds the end of
    # the document from 3 and the start of the one from 9.
    starts = Documents.of(torch.tensor([[0, 0, 0, 3, 3, 3, 3, 3, 3, 9, 9, 9, 9, 9, 9, 9]]))
    whole = lambda q, k: ChunkPair(0, 0, q, k)  # noqa: E731
    assert document_parts(whole(2, 2), 4, None) == [
        (slice(None), [Part(slice(0, 4), slice(0, 4), True)])]
    assert document_parts(whole(2, 2), 4, starts) == [(slice(None), [
        Part(slice(0, 1), slice(0, 1), True, 3), Part(slice(1, 4), slice(1, 4), True, 9)])]
    assert document_parts(whole(2, 0), 4, starts) == [(slice(None), [
        Part(slice(0, 1), slice(3, 4), False, 3)])]  # only key 3 is the row's document
    assert document_parts(whole(2, 1), 4, starts) == [(slice(None), [
        Part(slice(0, 1), slice(0, 4), False, 3)])]
    assert document_parts(whole(3, 1), 4, starts) == [(slice(None), [])]


def test_a_run_trains_with_boundaries_and_refuses_to_resume_without(tmp_path, dist_cleanup):
    from cope_megatron.data.prep.prep import prepare
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.train import run_train
    from tests.helpers import WORDS, debug_overrides, small_data

    rng = random.Random(0)  # short documents: every sample packs several
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "docs.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))}) + "\n"
        for _ in range(400)))
    prepare(small_data(tmp_path), seq_len=32, seed=7, progress=False)

    def train(name: str, boundaries: bool, steps: int = 3):
        cfg = load_config(debug_overrides(tmp_path / "shards", tmp_path / name, **{
            "train.steps": steps, "data.document_boundaries": str(boundaries).lower()}))
        try:
            return run_train(cfg, evaluate_after=name == "on")
        finally:
            destroy_distributed()

    (on, report), (off, _) = train("on", True), train("off", False)
    assert on.losses[0] != off.losses[0]
    assert report["lengths"][64]["ppl"] > 1
    with pytest.raises(Exception, match="data.document_boundaries"):
        train("on", False, steps=4)
