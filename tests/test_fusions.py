"""``fusion.*``: compiled layers and the chunked cross-entropy compute the unfused model's
loss and gradients (fp32: losses to 1e-6, gradients to 1e-5 relative + 1e-6 absolute, the
summation-order rounding of fused kernels and chunked weight gradients; bf16 in
``assert_same``), at TP=1 in this process, under TP=2 with sequence parallelism on forked
ranks, and (slow) under recomputation, CP=2 and ZeRO-3; the chunked loss never computes
the logits of all tokens at once, and the estimate counts what it saves."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cope_megatron.config import load_config
from cope_megatron.model import fusions
from tests.helpers import forked_ranks
from tests.parallel_worker import launch, layout

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.seq_length=32"]
VOCAB = 300  # padded to 384: no other dimension of the model
TOKENS = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0))
CHUNKED = ["fusion.cross_entropy=chunked", "fusion.chunk_tokens=10"]  # 7 uneven chunks
WEIGHTS = torch.rand(2, 32, generator=torch.Generator().manual_seed(1))
"""Per-token loss weights: the gradients see each token's loss at its own position."""


def loss_and_grads(overrides: list[str], tensor: int = 1, bf16: bool = False) -> tuple:
    """Per-token losses of ``TOKENS`` and the gradients of their weighted sum, on this
    process's TP rank."""
    from megatron.core import parallel_state

    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.model.gpt import build_gpt, token_losses
    from cope_megatron.pe import model_pe

    cfg = load_config(SMALL + overrides + [f"parallel.tensor={tensor}"])
    init_distributed(tensor)
    seed_everything(0)
    model = build_gpt(cfg, model_pe(cfg.model), VOCAB)
    if bf16:
        model = model.bfloat16()
    losses = token_losses(model, TOKENS)[0]
    (losses * WEIGHTS).sum().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    parallel_state.destroy_model_parallel()
    return losses.detach(), grads


def assert_same(fused: tuple, unfused: tuple, bf16: bool = False) -> None:
    """fp32: to rounding. bf16: losses to rounding too (the logits of a token are the same
    dot products), gradients to 1% of each tensor's largest, the weight gradient being a
    sum of chunks rounded to bf16 apiece."""
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-6, atol=1e-6)
    assert fused[1].keys() == unfused[1].keys()  # the same parameter names: checkpoints load
    for name, grad in unfused[1].items():
        atol = 1e-2 * grad.abs().max().item() if bf16 else 1e-6
        torch.testing.assert_close(fused[1][name], grad, rtol=0 if bf16 else 1e-5, atol=atol,
                                   msg=name)


def test_auto_is_unfused_until_the_gpu_suite_flips_it_and_resumes_may_switch(monkeypatch):
    from cope_megatron.config.resume_keys import ALLOWED, classify

    assert {classify(f"fusion.{key}") for key in ("layers", "cross_entropy", "chunk_tokens")
            } == {ALLOWED}
    cfg = load_config([])
    for name in ("layers", "cross_entropy"):
        assert not fusions.enabled(cfg.fusion, name, "cpu")
        assert not fusions.enabled(cfg.fusion, name, "cuda")
    monkeypatch.setattr(fusions, "AUTO_ON_CUDA", frozenset({"cross_entropy"}))
    assert fusions.enabled(cfg.fusion, "cross_entropy", "cuda")
    assert not fusions.enabled(cfg.fusion, "cross_entropy", "cpu")
    assert not fusions.enabled(cfg.fusion, "layers", "cuda")
    forced = load_config(["fusion.layers=compile", "fusion.cross_entropy=full"]).fusion
    assert fusions.enabled(forced, "layers", "cpu")
    assert not fusions.enabled(forced, "cross_entropy", "cuda")


@pytest.mark.parametrize(("untied", "bf16"), [(False, False), (True, False), (False, True)])
def test_chunked_cross_entropy_equals_megatrons(dist_cleanup, untied, bf16):
    tie = [f"model.untie_embeddings={str(untied).lower()}"]
    assert_same(loss_and_grads(CHUNKED + tie, bf16=bf16),
                loss_and_grads(["fusion.cross_entropy=full"] + tie, bf16=bf16), bf16)


class LargestLogits(TorchDispatchMode):
    """The most elements of any [s, b, vocab] tensor (logits, softmax, their gradients)
    an op makes."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_cross_entropy_never_holds_all_logits(dist_cleanup):
    from cope_megatron.config import padded_vocab_size

    vocab, tokens = padded_vocab_size(VOCAB, 1), TOKENS.shape[0] * (TOKENS.shape[1] - 1)
    seen = {}
    for name, overrides in {"full": ["fusion.cross_entropy=full"], "chunked": CHUNKED}.items():
        with LargestLogits(vocab) as mode:
            loss_and_grads(overrides)
        seen[name] = mode.largest
    assert seen["full"] == tokens * vocab
    assert seen["chunked"] == 5 * TOKENS.shape[0] * vocab  # 10 tokens: 5 positions × batch 2


def test_estimate_counts_the_logits_the_chunked_loss_never_keeps(dist_cleanup):
    """What a forward leaves for backward drops by the fp32 softmax of every token (less
    the chunks' labels and loss bookkeeping, a few bytes a token); the estimate's
    ``working`` part holds one chunk's logits instead."""
    from cope_megatron.config import Layout
    from cope_megatron.distributed.parallel import init_distributed
    from cope_megatron.estimate.memory import activation_bytes, saved_for_backward
    from cope_megatron.model.gpt import build_gpt
    from cope_megatron.pe import model_pe

    init_distributed(1)
    measured, estimated = {}, {}
    for name, overrides in {"full": ["fusion.cross_entropy=full"], "chunked": CHUNKED}.items():
        cfg = load_config(SMALL + overrides + ["train.micro_batch_size=2"])
        measured[name] = saved_for_backward(build_gpt(cfg, model_pe(cfg.model), VOCAB), TOKENS)
        estimated[name] = activation_bytes(cfg, model_pe(cfg.model), Layout.of(cfg, 1),
                                           vocab_size=VOCAB, device="cpu")
    logits = 64 * 384 * 4  # tokens × padded vocabulary × fp32
    assert estimated["full"]["saved"] - estimated["chunked"]["saved"] == logits
    assert measured["full"] - measured["chunked"] == pytest.approx(logits, rel=0.01)
    assert estimated["chunked"]["working"] == 10 * 384 * (4 + 4)


def test_a_run_the_logits_overflow_is_told_to_chunk_the_loss():
    from cope_megatron.estimate import estimate, smallest_fitting_change
    from cope_megatron.pe import model_pe

    cfg = load_config(["configs/model/125m.yaml", "model.seq_length=8192",
                       "train.micro_batch_size=4", "data.vocab_size=256000"])
    est = estimate(cfg, model_pe(cfg.model), gpus=1, gpu_memory_gib=40)
    assert not est.fits  # 32k tokens × 256k fp32 logits: 31 GiB of the 41
    overrides, fixed = smallest_fitting_change(est)
    assert overrides == "fusion.cross_entropy=chunked" and fixed.fits


def test_compiled_layers_equal_eager(dist_cleanup):
    """One layer keeps the first compile short (cold Inductor cache ~30 s on 2 busy
    cores, warm ~8 s)."""
    one = ["model.num_layers=1", "model.hidden_size=16", "model.num_attention_heads=2"]
    assert_same(loss_and_grads(one + ["fusion.layers=compile"]),
                loss_and_grads(one + ["fusion.layers=eager"]))


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_compiled_layers_under_recomputation(dist_cleanup, recompute):
    """Megatron's recomputation calls the compiled layers again in backward."""
    mode = [f"train.recompute={recompute}"]
    assert_same(loss_and_grads(mode + ["fusion.layers=compile"]), loss_and_grads(mode))


def check_layouts(tmp_path, layouts: dict) -> None:
    """Each layout's ``fused`` variant trains as its ``unfused`` one: losses over 3 steps
    (so the gradients of every parameter), PE-parameter gradients of each step."""
    for name, result in launch(tmp_path, 2, layouts).items():
        fused, unfused = result["fused"], result["unfused"]
        torch.testing.assert_close(fused["losses"], unfused["losses"], rtol=1e-5, atol=0,
                                   msg=name)
        for step_fused, step_unfused in zip(fused["grads"], unfused["grads"], strict=True):
            for param, grad in step_unfused.items():
                torch.testing.assert_close(torch.tensor(step_fused[param]), torch.tensor(grad),
                                           rtol=1e-5, atol=1e-6, msg=f"{name} {param}")


def pair(fused: list[str], *base: str) -> dict:
    return {"fused": [*base, *fused], "unfused": list(base)}


def compare_on_tp_ranks(fused: list[str], unfused: list[str]) -> None:
    assert_same(loss_and_grads(fused, tensor=2), loss_and_grads(unfused, tensor=2))


def test_chunked_cross_entropy_under_tp2_sequence_parallel():
    """Sequence parallelism gathers each chunk's rows rank by rank: the per-token losses
    come back at their positions (weighted, so a misplaced loss changes the gradients)."""
    base = ["model.pe=cope", "parallel.sequence=true"]
    forked_ranks(2, compare_on_tp_ranks, base + ["fusion.cross_entropy=chunked",
                                                 "fusion.chunk_tokens=12"], base)


@pytest.mark.slow
def test_fusions_under_tp2_and_zero3(tmp_path):
    """Compiled layers under TP=2 + SP and under CP=2 (the ring's exchange inside the
    compiled layer), and both fusions under ZeRO-3 over two data-parallel ranks, with an
    untied output layer whose weight ZeRO-3 partitions (gathered by the output layer's
    hooks, which each chunk calls)."""
    check_layouts(tmp_path, {
        "cp2_compiled": layout(1, False, 0, pair(["fusion.layers=compile"], "model.pe=cope"),
                               context=2),
        "tp2_sp_compiled": layout(2, True, 0, pair(["fusion.layers=compile"], "model.pe=cope")),
        "tp2_compiled_chunked": layout(2, False, 0, pair(
            ["fusion.layers=compile", "fusion.cross_entropy=chunked"], "model.pe=alibi")),
        "dp2_zero3": layout(1, False, 3, pair(
            ["fusion.cross_entropy=chunked", "fusion.chunk_tokens=20", "fusion.layers=compile"],
            "model.pe=rope", "model.untie_embeddings=true")),
    })
