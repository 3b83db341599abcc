"""RoPE scaling (``pe.rope_scaling``), partial rotary and p-RoPE (``pe.rope``): the rotary
tables against a float64 implementation of each paper's formula, factor 1 as plain RoPE,
the Megatron model against the reference model and the exported GPT-NeoX in
``transformers``, an evaluation of a trained run with scaling as an override, and the
errors that name the key."""

import math
import os

import pytest
import torch
import yaml

from cope_megatron.config import ConfigError, load_config
from cope_megatron.distributed.cpu_compat import apply_cpu_compat
from cope_megatron.pe.rope_scaling import rotary_embedding
from cope_megatron.startup import check

apply_cpu_compat()
L0, HEAD_DIM, BASE = 256, 64, 10000.0
LENGTHS = [128, 256, 1024, 4096]


def reference(kind: str, length: int, *, factor: float = 4.0, dim: int = HEAD_DIM,
              keep: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0
              ) -> tuple[torch.Tensor, float]:
    """float64 (θ_i per position, the q/k scale) at a forward of ``length`` tokens."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    theta = BASE ** (-2 * i / dim)  # Su et al. 2021, eq. 15
    scale = 1.0
    if kind == "linear":  # Chen et al. 2023, eq. 3: f'(x, m) = f(x, m·L/L')
        theta = theta / factor
    elif kind == "ntk":  # YaRN eq. 14-16: b' = b·s^(|D|/(|D|−2))
        theta = (BASE * factor ** (dim / (dim - 2))) ** (-2 * i / dim)
    elif kind == "dynamic":  # YaRN §3.3, with Hugging Face's s·L/L₀ − (s − 1)
        s = max(1.0, factor * length / L0 - (factor - 1))
        theta = (BASE * s ** (dim / (dim - 2))) ** (-2 * i / dim)
    elif kind == "yarn":  # YaRN eq. 17-20 (ramp over dimensions as its code), eq. 22
        def dimension(rotations):  # where r(d) = L₀/λ_d equals ``rotations``
            return dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(BASE))

        low = max(math.floor(dimension(beta_fast)), 0)
        high = min(math.ceil(dimension(beta_slow)), dim - 1)
        gamma = 1 - ((i - low) / (high - low)).clamp(0, 1)  # 1: keep, 0: interpolate
        theta = (1 - gamma) * theta / factor + gamma * theta
        scale = 0.1 * math.log(factor) + 1
    theta[int(keep * dim // 2):] = 0  # Barbero et al. 2024, §6: p-RoPE
    return theta, scale


def config(*overrides: str):
    return load_config(["model.hidden_size=256", "model.num_attention_heads=4",
                        f"model.seq_length={L0}", *overrides])


def table(module, length: int) -> tuple[torch.Tensor, float]:
    """The module's angles [length, d/2] and q/k scale."""
    out = module(length)
    emb, scale = out if isinstance(out, tuple) else (out, 1.0)
    half = emb.shape[-1] // 2
    assert torch.equal(emb[..., :half], emb[..., half:])  # halves rotated together
    return emb[:, 0, 0, :half], scale


@pytest.mark.parametrize("kind", ["linear", "ntk", "dynamic", "yarn"])
def test_tables_match_the_papers_formulas(kind):
    module = rotary_embedding(config(f"pe.rope_scaling.type={kind}",
                                     "pe.rope_scaling.factor=4"))
    for length in LENGTHS:
        theta, scale = reference(kind, length)
        angles, got_scale = table(module, length)
        torch.testing.assert_close(angles[1].double(), theta, rtol=1e-6, atol=0)
        positions = torch.arange(length, dtype=torch.float64)[:, None]
        tol = 1e-6 + 1e-7 * length  # float32 angles at position m
        for f in (torch.cos, torch.sin):
            torch.testing.assert_close(f(angles.double()), f(positions * theta), rtol=0,
                                       atol=tol)
        assert got_scale == pytest.approx(scale, rel=1e-12)
    if kind == "yarn":  # the ramp keeps the highest frequencies, interpolates the lowest
        plain, _ = reference("none", L0)
        assert theta[0] == plain[0] and theta[-1] == pytest.approx(plain[-1] / 4)


def test_factor_one_is_plain_rope():
    plain = rotary_embedding(config())
    for kind in ("linear", "ntk", "yarn"):
        scaled = rotary_embedding(config(f"pe.rope_scaling.type={kind}"))
        for length in LENGTHS:
            assert torch.equal(scaled(length), plain(length)), (kind, length)
    dynamic = rotary_embedding(config("pe.rope_scaling.type=dynamic",
                                      "pe.rope_scaling.factor=8"))
    for length in (64, L0):  # up to L₀ dynamic NTK is plain RoPE at any factor
        assert torch.equal(dynamic(length), plain(length))
    assert not torch.equal(dynamic(2 * L0), plain(2 * L0))


@pytest.mark.parametrize("kind", ["none", "linear", "yarn"])
def test_partial_rotary_and_p_rope_tables(kind):
    # Partial: frequencies spanning the whole range over the rotated half.
    partial = rotary_embedding(config("pe.rope.percent=0.5", f"pe.rope_scaling.type={kind}",
                                      "pe.rope_scaling.factor=2"))
    angles, _ = table(partial, L0)
    assert angles.shape[-1] == HEAD_DIM // 4
    theta, _ = reference(kind, L0, factor=2, dim=HEAD_DIM // 2)
    torch.testing.assert_close(angles[1].double(), theta, rtol=1e-6, atol=0)
    # p-RoPE: the highest frequencies as RoPE's, the lowest zero (no rotation at all).
    p_rope = rotary_embedding(config("pe.rope.keep_frequencies=0.25",
                                     f"pe.rope_scaling.type={kind}", "pe.rope_scaling.factor=2"))
    angles, _ = table(p_rope, L0)
    theta, _ = reference(kind, L0, factor=2, keep=0.25)
    torch.testing.assert_close(angles[1].double(), theta, rtol=1e-6, atol=0)
    assert (angles[:, HEAD_DIM // 8:] == 0).all() and (angles[1, :HEAD_DIM // 8] > 0).all()


# -- the model: Megatron = reference model = exported GPT-NeoX ---------------------------

MODEL_VARIANTS = {
    "linear": ["pe.rope_scaling.type=linear", "pe.rope_scaling.factor=4"],
    "ntk": ["pe.rope_scaling.type=ntk", "pe.rope_scaling.factor=4"],
    "dynamic": ["pe.rope_scaling.type=dynamic", "pe.rope_scaling.factor=2"],
    "yarn": ["pe.rope_scaling.type=yarn", "pe.rope_scaling.factor=4",
             "pe.rope_scaling.beta_fast=8", "pe.rope_scaling.mscale=2"],
    "partial_yarn": ["pe.rope.percent=0.5", "pe.rope_scaling.type=yarn",
                     "pe.rope_scaling.factor=4", "pe.rope_scaling.original_length=16"],
    "p_rope_ntk": ["pe.rope.keep_frequencies=0.5", "pe.rope_scaling.type=ntk",
                   "pe.rope_scaling.factor=4"],
    "cope_rope_yarn": ["model.pe=cope_rope", "pe.rope_scaling.type=yarn",
                       "pe.rope_scaling.factor=4"],
}


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_megatron_model_equals_reference_and_transformers(variant, dist_cleanup):
    from cope_megatron.distributed.parallel import init_distributed
    from cope_megatron.hf.export import NAMES, hf_config
    from cope_megatron.hf.modeling_cope_megatron import CopeMegatronForCausalLM
    from cope_megatron.hf.standard import BUILDERS, rename, standard_architecture
    from cope_megatron.model.gpt import build_gpt

    vocab, seq = 128, 32
    cfg = load_config(["model.hidden_size=64", "model.num_attention_heads=4",
                       f"model.seq_length={seq}", "model.init_method_std=0.2",
                       *MODEL_VARIANTS[variant]])
    pe = check(cfg, 1, data=False)
    init_distributed(1)
    torch.manual_seed(0)
    ours = build_gpt(cfg, pe, vocab).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("attention.table"):  # CoPE's starts at 0: make it count
                param.normal_(0, 0.5)
    state = rename({k: v for k, v in ours.state_dict().items()
                    if not k.endswith("_extra_state")}, NAMES)
    config = hf_config(cfg, vocab)
    reference_model = CopeMegatronForCausalLM(config).eval()
    reference_model.load_state_dict({**state, "output_layer.weight":
                                     state["word_embeddings.weight"]}, strict=True)
    plain = CopeMegatronForCausalLM(hf_config(load_config([
        "model.hidden_size=64", "model.num_attention_heads=4", f"model.seq_length={seq}",
        f"model.pe={cfg.model.pe}"]), vocab)).eval()
    plain.load_state_dict(reference_model.state_dict())
    standard = standard_architecture(cfg, pe)
    assert standard == ("gpt_neox" if cfg.model.pe == "rope"
                        and cfg.pe.rope.keep_frequencies == 1 else None)
    gen = torch.Generator().manual_seed(1)
    for length in (seq, 4 * seq):  # increasing: Hugging Face's dynamic caches the longest
        tokens = torch.randint(0, vocab, (2, length), generator=gen)
        with torch.no_grad():
            got = ours(tokens, torch.arange(length).expand_as(tokens), None).float()
            torch.testing.assert_close(reference_model(tokens).logits, got, rtol=1e-5,
                                       atol=1e-5)
            if standard:
                # Hugging Face's dynamic computes its base in float32 tensors: 1e-4.
                neox = BUILDERS[standard](cfg, vocab, dict(state)).eval()
                torch.testing.assert_close(neox(input_ids=tokens).logits, got, rtol=1e-4,
                                           atol=1e-4)
            if length > seq:  # the scaling changes the function: the check above can fail
                assert (plain(tokens).logits - got).abs().max() > 1e-3



# -- evaluation of a trained run, sweeps, the report ------------------------------------


def test_eval_takes_rope_scaling_as_an_override_of_a_trained_run(prepared, tmp_path):
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.report.runs import load_run
    from cope_megatron.train import run_eval, run_train
    from tests.helpers import debug_overrides, train_here

    shards, _, _ = prepared
    run = tmp_path / "run"
    train_here(shards, run, **{"train.steps": 2})
    base = [str(run / "config.yaml"), "eval.passkey_samples=0", "eval.length_multipliers=[1, 4]"]

    def evaluate(*overrides: str) -> dict:
        try:
            return run_eval(load_config([*base, *overrides]))
        finally:
            destroy_distributed()

    plain = evaluate()
    yarn = evaluate("pe.rope_scaling.type=yarn", "pe.rope_scaling.factor=8")
    assert (plain["pe"], yarn["pe"]) == ("rope", "rope+yarn×8")
    assert load_run(run).label == "rope+yarn×8"  # the report's row for what eval.json holds
    long = 4 * 32
    assert math.isfinite(yarn["lengths"][long]["ppl"])
    assert yarn["lengths"][long]["ppl"] != plain["lengths"][long]["ppl"]
    # Which model it is stays refused at evaluation, and the scaling on resume.
    with pytest.raises(ConfigError, match="pe.rope.base"):
        evaluate("pe.rope.base=500")
    with pytest.raises(ConfigError, match="pe.rope_scaling.type"):
        try:
            run_train(load_config(debug_overrides(shards, run, **{
                "train.steps": 3, "pe.rope_scaling.type": "yarn",
                "pe.rope_scaling.factor": 8})), evaluate_after=False)
        finally:
            destroy_distributed()


@pytest.mark.parametrize(("overrides", "key"), [
    (["model.pe=alibi", "pe.rope_scaling.type=yarn", "pe.rope_scaling.factor=2"],
     "pe.rope_scaling.type"),
    (["pe.rope_scaling.type=linear", "pe.rope_scaling.factor=0.5"], "pe.rope_scaling.factor"),
    (["pe.rope.percent=0"], "pe.rope.percent"),
    (["pe.rope.percent=1.5"], "pe.rope.percent"),
    (["pe.rope.percent=0.3"], "pe.rope.percent"),  # 0.3 × 64 = 19 dimensions: odd
    (["pe.rope.keep_frequencies=0"], "pe.rope.keep_frequencies"),
    (["pe.rope_scaling.type=yarn", "pe.rope_scaling.beta_fast=0.5"], "pe.rope_scaling.beta"),
])
def test_bad_rope_options_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check(config(*overrides), 1, data=False)


def test_unknown_scaling_type_names_the_key():
    with pytest.raises(ConfigError, match=r"pe\.rope_scaling\.type: 'xpos' is not one of"):
        config("pe.rope_scaling.type=xpos")


def test_scaling_is_refused_on_resume_and_read_by_both_rotary_pes():
    from cope_megatron.config.resume_keys import classify
    from cope_megatron.pe import model_pe

    assert classify("pe.rope_scaling.factor") == "refused"
    for pe, reads in (("rope", True), ("cope_rope", True), ("alibi", False), ("cope", False)):
        options = model_pe(load_config([f"model.pe={pe}"]).model).options
        assert ("rope_scaling" in options) == reads, pe


FAKE_SLURM = {"sbatch": 'echo "$*" "COMMAND=$COMMAND" >> "$FAKE_LOG"; echo 778',
              "squeue": "echo PENDING"}


@pytest.mark.integration
def test_sweep_evaluates_its_variants_on_the_trained_checkpoints(prepared, tmp_path, capsys,
                                                                 monkeypatch):
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.launch import sweep as sw
    from cope_megatron.report import write_report
    from cope_megatron.train import run_train
    from tests.helpers import debug_overrides

    shards, _, _ = prepared
    overrides = dict(o.split("=", 1) for o in debug_overrides(shards, "unused"))
    del overrides["run.dir"]
    overrides.update({"train.steps": 2, "eval.passkey_samples": 0})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "out": str(tmp_path / "sweep"), "base": [], "overrides": overrides,
        "axes": {"model.pe": ["rope", "alibi"]},
        "evaluations": {"yarn": {"of": {"model.pe": "rope"}, "overrides": {
            "pe.rope_scaling.type": "yarn", "pe.rope_scaling.factor": 4}}}}))
    spec = sw.load_spec(path)
    rope, _, variant = runs = sw.create(spec)
    assert [r.name for r in runs] == ["pe-rope", "pe-alibi", "pe-rope_yarn"]
    assert (variant.dir / "checkpoints").resolve() == (rope.dir / "checkpoints").resolve()
    assert " eval " in (variant.dir / "command.sh").read_text()
    config = yaml.safe_load((variant.dir / "config.yaml").read_text())
    assert config["pe"]["rope_scaling"]["type"] == "yarn"
    assert config["run"]["dir"] == str(variant.dir)

    sw.run_local(spec, [variant])
    assert "pe-rope_yarn: waits for pe-rope" in capsys.readouterr().err
    try:
        run_train(load_config([str(rope.dir / "config.yaml")]))
    finally:
        destroy_distributed()
    sw.run_local(spec, [variant])  # `cope-megatron eval` in its own process
    assert sw.status(variant)[0] == "done", (variant.dir / "eval.log").read_text()[-3000:]
    assert not (rope.dir / "eval.log").exists()
    report = write_report([rope.dir, variant.dir], tmp_path / "report").read_text()
    assert "| rope |" in report and "| rope+yarn×4 |" in report

    # SLURM: the variant is submitted to run after its trained run's job.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{text}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "sbatch.log"))
    for run in (rope, variant):
        (run.dir / "eval.json").unlink()
    rope.write_record(state="submitted", job="777")
    sw.submit_slurm(spec, [variant])
    (line,) = (tmp_path / "sbatch.log").read_text().splitlines()
    assert "--dependency=afterok:777 --kill-on-invalid-dep=yes" in line
    assert "--export=ALL,COMMAND=eval" in line
