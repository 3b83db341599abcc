"""FIRE (Li et al. 2023) and Kerple (Chi et al. 2022): each bias against a float64
implementation of its paper's formula, written here element by element; gradients of every
parameter by gradcheck; FIRE's extrapolation by construction (the MLP's input stays in
[0, 1] at any length, so the bias far beyond the training length takes only values f_θ
takes on [0, 1]); the FlexAttention forward against the materialized bias; the estimate's
parameter count; one clear error per bad setting. TP/SP/CP parity is in the layout tests
(tests/test_parallel.py, every registered PE), export in tests/test_export.py."""

import math

import pytest
import torch

from cope_megatron.config import ConfigError, PEConfig, load_config
from cope_megatron.pe import get_pe
from cope_megatron.pe.base import AttentionShape
from cope_megatron.pe.fire import fire_bias, fire_input, fire_score
from cope_megatron.pe.kerple import FLOOR, kerple_bias

# TP rank 1 of 2: heads 3..5 of 6, so per-head parameters must be read by global head.
RANK1 = AttentionShape.of_rank(total_heads=6, total_kv_heads=6, head_dim=8, tp_size=2,
                               tp_rank=1)
WHOLE = AttentionShape.of_rank(total_heads=6, total_kv_heads=6, head_dim=8)


def build(pe: str, shape: AttentionShape, **options) -> torch.nn.Module:
    torch.manual_seed(0)  # the same draw on every "rank"
    cfg = PEConfig()
    for section, values in options.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return get_pe(pe).attention(shape, cfg).double()


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# -- Kerple -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_is_the_papers_kernel(variant):
    whole, rank1 = build("kerple", WHOLE, kerple={"variant": variant}), \
        build("kerple", RANK1, kerple={"variant": variant})
    length = 50
    got = rank1.distance_bias(length, torch.device("cpu"))
    assert got.shape == (3, length) and got.dtype == torch.float64
    for h in range(3):
        rho1, rho2 = whole.r1_raw[3 + h].item(), whole.r2_raw[3 + h].item()
        r1 = softplus(rho1) + FLOOR
        if variant == "log":
            r2 = softplus(rho2) + FLOOR
            want = [-r1 * math.log(1 + r2 * d) for d in range(length)]
        else:
            r2 = FLOOR + (2 - FLOOR) / (1 + math.exp(-rho2))
            assert FLOOR < r2 < 2
            want = [-r1 * d ** r2 for d in range(length)]
        assert r1 > 0 and r2 > 0
        torch.testing.assert_close(got[h], torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_gradients(variant):
    """gradcheck in r₁ and r₂'s parameters, distance 0 included (where d^r₂ has a 0·log 0
    derivative in r₂ unless taken with care)."""
    module = build("kerple", RANK1, kerple={"variant": variant, "max_exponent": 1.5})
    distance = torch.arange(12)

    def bias(r1_raw, r2_raw):
        r1 = torch.nn.functional.softplus(r1_raw) + FLOOR
        r2 = (torch.nn.functional.softplus(r2_raw) + FLOOR if variant == "log"
              else FLOOR + (1.5 - FLOOR) * torch.sigmoid(r2_raw))
        return kerple_bias(distance, r1, r2, variant)

    params = (module.r1_raw.detach().requires_grad_(), module.r2_raw.detach().requires_grad_())
    assert torch.autograd.gradcheck(bias, params, fast_mode=True)
    # And the module's own path reaches both parameters.
    module.distance_bias(12, torch.device("cpu")).sum().backward()
    assert module.r1_raw.grad.abs().min() > 0 and module.r2_raw.grad.abs().min() > 0


# -- FIRE ---------------------------------------------------------------------------------

def fire_reference(module, heads: range, length: int, threshold_init: float) -> torch.Tensor:
    """The paper's b(i, j) = f(ψ(i − j) / ψ(max(L, i))), ψ(x) = log(|c|·x + 1), element by
    element in Python floats (float64): [len(heads), length, length], 0 above the diagonal."""
    c = abs(module.c.item())
    threshold = abs(module.threshold_scale.item() * threshold_init)
    w1, b1 = module.mlp_in_weight.tolist(), module.mlp_in_bias.tolist()
    w2, b2 = module.mlp_out_weight.tolist(), module.mlp_out_bias.tolist()
    out = torch.zeros(len(heads), length, length, dtype=torch.float64)
    for i in range(length):
        for j in range(i + 1):
            x = math.log(c * (i - j) + 1) / (math.log(c * max(threshold, i) + 1) + 1e-6)
            hidden = [max(0.0, w * x + b) for w, b in zip(w1, b1)]
            for n, h in enumerate(heads):
                out[n, i, j] = sum(w * a for w, a in zip(w2[h], hidden)) + b2[h]
    return out


def test_fire_is_the_papers_function():
    """At TP rank 1 of 2, with a threshold inside the sequence (both branches of max)."""
    options = {"fire": {"threshold_init": 6.5, "c_init": 0.3, "mlp_width": 8}}
    whole, rank1 = build("fire", WHOLE, **options), build("fire", RANK1, **options)
    length = 20
    pos = torch.arange(length)
    got = rank1.position_bias(length, torch.device("cpu")).block(pos, pos)
    assert got.shape == (3, length, length) and got.dtype == torch.float64
    want = fire_reference(whole, range(3, 6), length, 6.5)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    torch.testing.assert_close(got[:, causal], want[:, causal], rtol=1e-12, atol=1e-12)


def test_fire_gradients():
    """gradcheck in c, the threshold multiplier and both MLP layers, with queries on both
    sides of the threshold (L = 4.5 between integer positions, where max is smooth)."""
    module = build("fire", WHOLE, fire={"threshold_init": 4.5, "mlp_width": 4})
    pos = torch.arange(9)
    names = ["c", "threshold_scale", "mlp_in_weight", "mlp_in_bias", "mlp_out_weight",
             "mlp_out_bias"]
    params = tuple(getattr(module, n).detach().requires_grad_() for n in names)

    def bias(*tensors):
        return fire_bias(pos[:, None], pos[None, :], *tensors, threshold_init=4.5).tril()

    assert torch.autograd.gradcheck(bias, params, fast_mode=True)
    module.position_bias(9, torch.device("cpu")).block(pos, pos).tril().sum().backward()
    for n in names:
        assert getattr(module, n).grad.abs().sum() > 0, n


def test_fire_score_is_fire_bias_at_one_pair_and_head():
    """The form FlexAttention's score_mod evaluates, the MLP unrolled per hidden unit, is
    ``fire_bias``, gradients in every tensor included, pair by pair and head by head on
    both sides of the threshold; a TP rank's heads are read by local index, as
    FlexAttention's head index is."""
    module = build("fire", RANK1, fire={"threshold_init": 4.5, "c_init": 0.3, "mlp_width": 5})
    bias = module.position_bias(9, torch.device("cpu"))
    assert bias.at.func is fire_score  # what flex_bias_attention's score_mod reads
    tensors = [t.detach().requires_grad_() for t in bias.tensors]
    pos = torch.arange(9)
    weights = torch.randn(3, 9, 9, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0)).tril()
    whole = (fire_bias(pos[:, None], pos[None, :], *tensors, threshold_init=4.5)
             * weights).sum()
    pairs = sum(fire_score(pos[i], pos[j], torch.tensor(h), *tensors, threshold_init=4.5)
                * weights[h, i, j] for h in range(3) for i in range(9) for j in range(i + 1))
    torch.testing.assert_close(pairs, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(pairs, tensors), torch.autograd.grad(whole, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threshold_init", [0.5, 5000.0])
def test_fire_extrapolates_by_construction(threshold_init):
    """Trained at 128 tokens, run at 16× (2048): the MLP's input ψ(i − j)/ψ(max(L, i)) lies
    in [0, 1] for every causal pair at every length, for any c and L (here L below every
    query, so the normalizer is the query's own ψ(i), and L beyond 16×), so the bias there
    takes only values f_θ takes on [0, 1] (the interval it was trained on). f_θ is piecewise
    linear in its scalar input, so its range on [0, 1] is spanned by its values at 0, 1 and
    its kinks (x = −b/w)."""
    module = build("fire", RANK1, fire={"threshold_init": threshold_init, "c_init": 0.7})
    length = 16 * 128
    pos = torch.arange(length, dtype=torch.float64)
    x = fire_input(pos[:, None], pos[None, :], module.c[0], torch.tensor(threshold_init))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert x[causal].min() >= 0 and x[causal].max() <= 1
    assert x[causal].max() > 0.5  # the interval is used, not collapsed to 0

    w, b = module.mlp_in_weight.detach(), module.mlp_in_bias.detach()
    kinks = (-b / w)[(-b / w > 0) & (-b / w < 1)]
    grid = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), kinks])
    with torch.no_grad():
        f = torch.relu(grid[:, None] * w + b) @ module.mlp_out_weight.T + module.mlp_out_bias
        rows = torch.arange(length - 64, length)  # the far rows; all rows of a block cost s²
        bias = module.position_bias(length, torch.device("cpu")).block(rows, rows.new_tensor(
            range(length)))
    low, high = f.min(0).values, f.max(0).values  # per head
    valid = rows[:, None] >= torch.arange(length)[None, :]
    for h in range(3):
        values = bias[h][valid]
        assert values.min() >= low[h] - 1e-9 and values.max() <= high[h] + 1e-9


def test_fire_below_the_threshold_is_a_function_of_distance():
    """For queries i ≤ L the normalizer is ψ(L) for all of them: FIRE is then a relative
    bias (its progressive interpolation starts beyond L)."""
    module = build("fire", WHOLE, fire={"threshold_init": 30.0})
    pos = torch.arange(30)
    with torch.no_grad():
        bias = module.position_bias(30, torch.device("cpu")).block(pos, pos)
    for d in range(5):
        diagonal = torch.diagonal(bias, offset=-d, dim1=1, dim2=2)  # [h, 30 − d]
        torch.testing.assert_close(diagonal, diagonal[:, :1].expand_as(diagonal))


# -- both ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pe, options", [("kerple", {"kerple": {"variant": "log"}}),
                                         ("kerple", {"kerple": {"variant": "power"}}),
                                         ("fire", {"fire": {"threshold_init": 50.0}})])
def test_flex_matches_materialized_bias(pe, options):
    """FlexAttention (forward, CPU) against the materialized bias, at TP rank 1 of 2 with
    grouped key/value heads and 150 tokens (a partial diagonal block)."""
    shape = AttentionShape.of_rank(total_heads=8, total_kv_heads=4, head_dim=16, tp_size=2,
                                   tp_rank=1)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 150, 16, generator=gen)
    k, v = (torch.randn(2, 2, 150, 16, generator=gen) for _ in range(2))
    out = {}
    for kernel in ("flex", "materialized"):
        torch.manual_seed(0)
        cfg = PEConfig(bias_kernel=kernel)
        for section, values in options.items():
            for key, value in values.items():
                setattr(getattr(cfg, section), key, value)
        with torch.no_grad():
            out[kernel] = get_pe(pe).attention(shape, cfg).eval()(q, k, v)
    torch.testing.assert_close(out["flex"], out["materialized"], rtol=0, atol=1e-5)


def test_estimate_counts_their_parameters():
    from cope_megatron.estimate.parameters import pe_parameters

    cfg = load_config(["model.num_attention_heads=8", "model.hidden_size=64",
                       "pe.fire.mlp_width=16"])
    width = 16
    assert pe_parameters(cfg, get_pe("fire")) == 2 + 2 * width + 8 * (width + 1)
    # c, L and the first layer on every TP rank; the output layer split by head.
    assert pe_parameters(cfg, get_pe("fire"), tensor=2) == 2 + 2 * width + 4 * (width + 1)
    assert pe_parameters(cfg, get_pe("kerple"), tensor=2) == 2 * 4
    assert get_pe("fire").biased and get_pe("kerple").biased


@pytest.mark.parametrize("overrides, key", [
    (["model.pe=fire", "pe.fire.threshold_init=0"], "pe.fire.threshold_init"),
    (["model.pe=fire", "pe.fire.threshold_init=-3"], "pe.fire.threshold_init"),
    (["model.pe=fire", "pe.fire.c_init=0"], "pe.fire.c_init"),
    (["model.pe=fire", "pe.fire.mlp_width=0"], "pe.fire.mlp_width"),
    (["model.pe=kerple", "pe.kerple.max_exponent=2.5"], "pe.kerple.max_exponent"),
    (["model.pe=kerple", "pe.kerple.max_exponent=0"], "pe.kerple.max_exponent"),
    (["model.pe=kerple", "pe.kerple.variant=cubic"], "pe.kerple.variant"),
])
def test_bad_settings_name_their_key(overrides, key):
    from cope_megatron.startup import check

    with pytest.raises(ConfigError, match=f"^{key}: "):
        check(load_config(overrides), 1, data=False)


def test_estimate_counts_what_fire_saves_for_backward():
    """``bias_saved``: fp32 elements per (query, key) pair that the bias computation keeps
    for backward, as measured on the materialized path."""
    from cope_megatron.pe.base import _causal_bias

    cfg = load_config(["model.pe=fire", "pe.fire.mlp_width=16"])
    module = get_pe("fire").attention(WHOLE, cfg.pe)
    s, saved = 128, {}
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _causal_bias(module.position_bias(s, torch.device("cpu")), 0, s, torch.zeros(1))
    per_pair = sum(saved.values()) / 4 / s**2
    assert get_pe("fire").bias_saved(cfg) == pytest.approx(per_pair, rel=0.02)
    assert get_pe("kerple").bias_saved is None  # its [h, s] table is O(s)


def test_estimate_counts_fire_per_layer_of_a_schedule():
    """FIRE in every other layer keeps half of what FIRE in every layer keeps beyond NoPE."""
    from cope_megatron.config import Layout
    from cope_megatron.estimate.memory import activation_bytes
    from cope_megatron.pe import model_pe

    saved = {}
    for name, overrides in {"fire": ["model.pe=fire"], "nope": ["model.pe=nope"],
                            "both": ["model.pe=fire", "model.pe_schedule=[fire,nope]"]}.items():
        cfg = load_config(["model.num_layers=4", "train.recompute=none", *overrides])
        saved[name] = activation_bytes(cfg, model_pe(cfg.model), Layout.of(cfg, 1),
                                       device="cpu")["saved"]
    assert saved["fire"] > saved["nope"]
    assert saved["both"] == pytest.approx((saved["fire"] + saved["nope"]) / 2, rel=1e-12)
