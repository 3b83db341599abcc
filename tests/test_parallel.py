"""Tensor, sequence and context parallelism do not change the model's function: for every
PE, TP=2 with SP and CP=2 (2 processes; plain TP=2 for some) match one process, loss at
each of 3 optimizer steps within 1e-5 in fp32 and equal PE-parameter gradients; TP=2 × DP=2
under ZeRO-2, CP=2 × TP=2 with SP, CP=4 and CP=2 × DP=2 under ZeRO-2 and ZeRO-3
(4 processes) match too (and RoPE scaling, ``SCALED``, in CP=2 × TP=2 with SP).
Gradient clipping is active, so DeepSpeed's TP-aware norm is checked as well.
Three launches in all (1, 2 and 4 ranks), each looping over its layouts."""

import numpy as np
import pytest

from cope_megatron.pe import model_pe
from tests.parallel_worker import BASE, SCALED, VARIANTS, VOCAB, launch, layout, pick

# Sequence parallelism changes what happens outside the core attention (norms, dropout,
# embeddings, the input FoX's gate projection gathers): every PE runs under TP=2 with SP,
# and under plain TP=2 those whose parameters TP splits or replicates in their own way.
TWO_RANKS = {"tp2": layout(2, False, 0, pick("cope", "cope_per_head", "t5", "fire", "fox",
                                             "learned")),
             "tp2_sp": layout(2, True, 0), "cp2": layout(1, False, 0, context=2)}
FOUR_RANKS = {
    "tp2_dp2_zero2": layout(2, True, 2, pick("cope", "cope_per_head", "t5", "alibi")),
    "cp2_tp2_sp": layout(2, True, 0, pick("cope", "cope_per_head", "alibi", "fox",
                                          "stickbreaking", "schedule", "length_scale",
                                          *SCALED), context=2),
    # Each kind of CP attention: CoPE's ring (alone, with RoPE), the softmax ring without
    # and with a bias, FoX's and stick-breaking's (the rings alone: tests/test_cp_*.py).
    "cp4": layout(1, False, 0, pick("cope", "cope_rope", "rope", "alibi", "fox",
                                    "stickbreaking"), context=4),
    "cp2_dp2_zero2": layout(1, False, 2, pick("cope"), context=2),
    "cp2_dp2_zero3": layout(1, False, 3, pick("cope"), context=2),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("tp1"), 1,
                  {"one": layout(1, False, 0, {**VARIANTS, **SCALED})})["one"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), 2, TWO_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("four"), 4, FOUR_RANKS)


def assert_matches(reference: dict, got: dict, full: bool = True) -> None:
    """Losses within 1e-5; ``full``: also the same initial model and PE gradients (ZeRO-0
    runs: ZeRO-3 partitions parameters, and ZeRO-2 gradients are not read here)."""
    report = {}
    for name, ref in reference.items():
        diff = np.abs(np.array(got[name]["losses"]) - np.array(ref["losses"])).max()
        report[name] = diff
        assert diff < 1e-5, (name, ref["losses"], got[name]["losses"])
        if not full:
            continue
        # The same seed gives the same full model for every layout.
        assert ref["init"].keys() == got[name]["init"].keys()
        for pname, value in ref["init"].items():
            assert got[name]["init"][pname] == pytest.approx(value, rel=1e-6), (name, pname)
        assert len(got[name]["grads"]) == len(ref["grads"]) == 3, name
        for step_ref, step_got in zip(ref["grads"], got[name]["grads"]):
            assert step_ref.keys() == step_got.keys(), name
            for pname in step_ref:
                np.testing.assert_allclose(step_got[pname], step_ref[pname], rtol=1e-4, atol=1e-7,
                                           err_msg=f"{name}: {pname}")
    print("max |Δloss| per PE:", report)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tp2", "tp2_sp"])
def test_tensor_parallel_matches_one_process(reference, two_ranks, name):
    got = two_ranks[name]
    assert_matches({k: reference[k] for k in got}, got)
    # ``cope-megatron estimate`` counts what one TP rank holds.
    from cope_megatron.config import load_config
    from cope_megatron.estimate import parameters

    for variant in got:
        cfg = load_config(BASE + VARIANTS[variant])
        pe = model_pe(cfg.model)
        assert parameters(cfg, pe, VOCAB, tensor=2) == got[variant]["params_per_rank"]
        assert parameters(cfg, pe, VOCAB) == reference[variant]["params_per_rank"]


@pytest.mark.integration
def test_context_parallel_matches_one_process(reference, two_ranks):
    assert_matches({k: reference[k] for k in VARIANTS}, two_ranks["cp2"])


@pytest.mark.integration
@pytest.mark.parametrize("name, full", [("tp2_dp2_zero2", False), ("cp2_tp2_sp", True),
                                        ("cp4", True), ("cp2_dp2_zero2", False),
                                        ("cp2_dp2_zero3", False)])
def test_four_rank_layouts_match_one_process(reference, four_ranks, name, full):
    """TP=2 × DP=2 (ZeRO-2), CP=2 × TP=2 with SP, CP=4, CP=2 × DP=2 (ZeRO-2, ZeRO-3)."""
    got = four_ranks[name]
    assert_matches({k: reference[k] for k in got}, got, full=full)
