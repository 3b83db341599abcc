"""``cope-megatron estimate`` against the model itself: parameter counts against the GPT
built on the meta device (every model config, every PE), activation memory against what
autograd actually keeps for backward, recomputation's identical losses and lower memory,
the fitting advice, and the MFU arithmetic."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cope_megatron.cli import main as cli
from cope_megatron.config import Layout, load_config
from cope_megatron.estimate import (
    activation_bytes,
    estimate,
    parameters,
    smallest_fitting_change,
)
from cope_megatron.estimate.flops import flops_per_token, throughput
from cope_megatron.estimate.memory import saved_for_backward
from cope_megatron.pe import REGISTRY, model_pe
from tests.helpers import debug_overrides, forked_ranks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
VARIANTS = {pe: [f"model.pe={pe}"] for pe in sorted(REGISTRY)}
VARIANTS["cope_per_head"] = ["model.pe=cope", "pe.cope.shared_table=false"]
VARIANTS["schedule"] = ["model.pe=cope", "model.pe_schedule=[rope,cope,t5]"]
VARIANTS["length_scale"] = ["model.pe=cope", "pe.length_scale.type=learned"]


@pytest.fixture
def one_process(dist_cleanup):
    from cope_megatron.distributed.parallel import init_distributed

    init_distributed(1)


@pytest.mark.parametrize("model", MODELS)
def test_parameter_count_matches_the_model_built_on_meta(model, one_process):
    from cope_megatron.model.gpt import build_gpt

    for name, overrides in VARIANTS.items():
        cfg = load_config([str(CONFIGS / "model" / f"{model}.yaml"), *overrides])
        with torch.device("meta"):
            gpt = build_gpt(cfg, model_pe(cfg.model), cfg.data.vocab_size)
        built = sum(p.numel() for p in gpt.parameters())
        assert parameters(cfg, model_pe(cfg.model), cfg.data.vocab_size) == built, (model, name)


@pytest.mark.parametrize("model", ["debug", "tiny"])
def test_activation_estimate_matches_what_autograd_keeps(model, one_process):
    """Within 20% for every PE and recomputation mode (the estimate's ``saved`` part; the
    ``working`` part is the one layer that backward recomputes at a time), and
    recomputation keeps less: selective at most what none keeps, full far less."""
    from cope_megatron.model.gpt import build_gpt

    for name, overrides in VARIANTS.items():
        measured = {}
        for mode in ("none", "selective", "full"):
            cfg = load_config([str(CONFIGS / "model" / f"{model}.yaml"), *overrides,
                               f"train.recompute={mode}"])
            gpt = build_gpt(cfg, model_pe(cfg.model), cfg.data.vocab_size)
            tokens = torch.randint(0, cfg.data.vocab_size,
                                   (cfg.train.micro_batch_size, cfg.model.seq_length + 1))
            measured[mode] = saved_for_backward(gpt, tokens)
            estimated = activation_bytes(cfg, model_pe(cfg.model), Layout.of(cfg, 1),
                                         device="cpu")["saved"]
            assert estimated == pytest.approx(measured[mode], rel=0.2), (model, name, mode)
        assert measured["selective"] <= measured["none"], name
        assert measured["full"] < measured["none"] / 2, name


def test_recomputation_gives_identical_losses(prepared, tmp_path, dist_cleanup):
    """With dropout, so recomputation must also replay the random streams."""
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.train import run_train

    shards, _, _ = prepared
    for pe in ("rope", "cope"):
        losses = {}
        for mode in ("none", "selective", "full"):
            cfg = load_config(debug_overrides(shards, tmp_path / f"{pe}_{mode}", **{
                "model.pe": pe, "train.recompute": mode, "model.hidden_dropout": 0.1}))
            losses[mode] = run_train(cfg, evaluate_after=False)[0].losses
            destroy_distributed()
        assert losses["selective"] == losses["none"] == losses["full"], (pe, losses)


def test_a_run_that_does_not_fit_gets_the_smallest_change_that_does():
    cfg = load_config([str(CONFIGS / "model" / "2.7b.yaml"), "model.pe=cope"])
    est = estimate(cfg, model_pe(cfg.model), gpus=8, gpu_memory_gib=80)
    assert not est.fits
    overrides, fixed = smallest_fitting_change(est)
    assert overrides == "zero.stage=1" and fixed.fits
    # ZeRO-1 splits exactly the optimizer state over the 8 replicas.
    assert fixed.memory["optimizer"] == pytest.approx(est.memory["optimizer"] / 8)
    assert fixed.memory["weights"] == est.memory["weights"]
    # On 24 GiB GPUs one change is not enough; what is suggested fits.
    small = estimate(cfg, model_pe(cfg.model), gpus=8, gpu_memory_gib=24)
    overrides, fixed = smallest_fitting_change(small)
    assert len(overrides.split()) >= 2 and fixed.fits, overrides
    tiny_gpu = estimate(cfg, model_pe(cfg.model), gpus=1, gpu_memory_gib=4)
    assert smallest_fitting_change(tiny_gpu) is None


def test_tensor_parallel_splits_memory_per_gpu():
    cfg = load_config([str(CONFIGS / "model" / "1.3b.yaml"), "model.pe=rope"])
    tp2 = load_config([str(CONFIGS / "model" / "1.3b.yaml"), "model.pe=rope",
                       "parallel.tensor=2", "parallel.sequence=true"])
    one, two = estimate(cfg, model_pe(cfg.model), 8), estimate(tp2, model_pe(tp2.model), 8)
    assert two.params == one.params
    assert one.params / 2 < two.params_per_rank < one.params / 2 * 1.01  # norms replicated
    assert two.activations["none"] == pytest.approx(one.activations["none"] / 2, rel=0.01)


def test_flex_bias_kernel_keeps_no_square_bias():
    """ALiBi on FlexAttention keeps what NoPE keeps; on the materialized bias, more."""
    def saved(*overrides: str) -> float:
        cfg = load_config([str(CONFIGS / "model" / "125m.yaml"), *overrides])
        layout = Layout.of(cfg, 1)
        return activation_bytes(cfg, model_pe(cfg.model), layout, "none")["saved"]

    nope = saved("model.pe=nope")
    assert saved("model.pe=alibi", "pe.bias_kernel=flex") == nope
    assert saved("model.pe=alibi", "pe.bias_kernel=materialized") > nope


def test_mfu_arithmetic_on_a_known_case():
    """A 2-layer model, hidden 64, 4 heads, seq 127 (64 visible keys on average), vocab
    128: by hand, 6 × 2 × weights + 3 × attention FLOPs per token."""
    cfg = load_config(["model.num_layers=2", "model.hidden_size=64",
                       "model.num_attention_heads=4", "model.seq_length=128", "model.pe=rope"])
    weights = 2 * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 256) + 128 * 64
    f = flops_per_token(cfg, model_pe(cfg.model), 128, seq_length=127)
    assert f.dense == 6 * weights
    assert f.attention == 3 * 2 * 4 * (2 * 2 * 16) * 64
    assert f.cope_matmul == 0
    got = throughput(tokens=1000, seconds=2.0, flops=f, devices=2, peak=1e-3)
    tflops = 500 * f.model / 2 / 1e12
    assert got["tokens_per_s"] == 500 and math.isclose(got["tflops_per_device"], tflops)
    assert math.isclose(got["mfu"], tflops / 1e-3)


@pytest.mark.parametrize("pe", ["cope", "fox", "stickbreaking"])
def test_flops_of_the_contextual_pes_on_the_known_case(pe):
    """The same model with CoPE and its peers: attention as RoPE's; CoPE adds its table
    product z = q·E (2·d·npos per head and token) and 10 elementwise operations per key,
    FoX a gate projection (hidden → heads per layer, in dense) and 2 per key,
    stick-breaking 10 per key; all × 3 for training, per layer and head, 64 keys."""
    cfg = load_config(["model.num_layers=2", "model.hidden_size=64",
                       "model.num_attention_heads=4", "model.seq_length=128", f"model.pe={pe}"])
    weights = 2 * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 256) + 128 * 64
    gate = {"fox": 2 * 64 * 4}.get(pe, 0)
    per_key = {"cope": 10, "fox": 2, "stickbreaking": 10}[pe]
    table = 2 * 4 * 2 * 16 * cfg.pe.cope.npos_max if pe == "cope" else 0
    f = flops_per_token(cfg, model_pe(cfg.model), 128, seq_length=127)
    assert f.dense == 6 * (weights + gate)
    assert f.attention == 3 * 2 * 4 * (2 * 2 * 16) * 64
    assert f.cope_matmul == 3 * table
    assert f.cope_elementwise == 3 * 4 * 2 * per_key * 64


@pytest.mark.integration
def test_estimate_command_prints_the_summary(capsys):
    out = subprocess.run(
        [sys.executable, "-m", "cope_megatron", "estimate", str(CONFIGS / "model" / "2.7b.yaml"),
         str(CONFIGS / "pe" / "cope.yaml"), "--gpus", "8", "--gpu-memory", "80"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2,599.7M parameters" in out.stdout
    assert "fits: NO" in out.stdout and "smallest change that fits: zero.stage=1" in out.stdout
    capsys.readouterr()
    assert cli(["estimate", str(CONFIGS / "model" / "1.3b.yaml"), "parallel.tensor=3"]) == 2
    assert "parallel.tensor" in capsys.readouterr().err


def _check_bf16_estimate(pe: str, context: int) -> None:
    """The estimate for this rank's share of the debug model in bf16 (``context`` CP ranks)
    within 5% of what autograd keeps there."""
    from cope_megatron.model.gpt import build_gpt

    cfg = load_config([str(CONFIGS / "model" / "debug.yaml"), f"model.pe={pe}",
                       "train.precision=bf16", f"parallel.context={context}"])
    gpt = build_gpt(cfg, model_pe(cfg.model), cfg.data.vocab_size).to(torch.bfloat16)
    tokens = torch.randint(0, cfg.data.vocab_size,
                           (cfg.train.micro_batch_size, cfg.model.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    estimated = activation_bytes(cfg, model_pe(cfg.model), Layout.of(cfg, context),
                                 device="cpu")["saved"]
    assert estimated == pytest.approx(saved_for_backward(gpt, tokens), rel=0.05), pe


@pytest.mark.parametrize("pe", ["rope", "fox", "stickbreaking", "cope"])
def test_bf16_activation_estimate_counts_the_ops_fp32_state(pe, one_process):
    """In bf16, FoX's and stick-breaking's ops keep their output in fp32 for backward
    besides the bf16 one (``PositionEncoding.fp32_output``), and CoPE's chunked op fp32
    copies of q, k, v and its output instead of the bf16 q, k, v: the estimate within 5%
    of what autograd keeps, RoPE's (none of these) beside them."""
    _check_bf16_estimate(pe, context=1)


def _cp_bf16_worker() -> None:
    """On each of 2 CP ranks, for RoPE, ALiBi, CoPE, FoX and stick-breaking."""
    from cope_megatron.distributed.parallel import init_distributed

    init_distributed(1, context=2)
    for pe in ["rope", "alibi", "cope", "fox", "stickbreaking"]:
        _check_bf16_estimate(pe, context=2)


@pytest.mark.integration
def test_context_parallel_bf16_activation_estimate():
    """Under CP every attention op keeps its output in fp32 (the partial softmaxes merge in
    it) and no [s, s] bias (the ring makes each block's when it needs it), and CoPE's CP op
    keeps the bf16 q, k, v: the estimate within 5% of what autograd keeps on a rank."""
    forked_ranks(2, _cp_bf16_worker)
