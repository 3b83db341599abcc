"""Resume a ZeRO-1/2/3 checkpoint on another data-parallel size, through DeepSpeed's
universal checkpoints (ZeRO-0 checkpoints load on any DP size as they are).

ZeRO partitions optimizer states by DP rank, so a checkpoint from DP=N cannot load on
DP=M. DeepSpeed's ``ds_to_universal`` rewrites it per parameter; the engine then loads it
with ``checkpoint.load_universal``. Two things our model needs first: the TP layout of
each parameter (``universal_checkpoint_info``: which are replicated, which cut along
rows; without it a TP change would be silently wrong), and, for stages 1–2, a copy of the
model-states files without Megatron's ``_extra_state: None`` entries, which the converter
cannot read. Each checkpoint records its layout (``layout.json``) so that a resume knows
when to convert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

LAYOUT = "layout.json"
INFO = "universal_checkpoint_info"
"""Where DeepSpeed stores ``model.universal_checkpoint_info`` in every model-states file."""


def _pattern(name: str) -> str:
    """A parameter name as a pattern for every layer (layer numbers generalized)."""
    return re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) + "$"


def checkpoint_info(model: torch.nn.Module) -> dict:
    """``universal_checkpoint_info`` for our GPT, from the tensor-parallel tags its layers
    set (Megatron's parallel linears and embedding, ``pe.base.head_sharded_parameter``):
    untagged parameters are replicated over TP ranks, tagged ones split along
    ``partition_dim`` (1: row-parallel). Saved in every checkpoint, it is the one record of
    the TP layout, which conversion (``ds_to_universal``) and export (``tp_merge_dim``)
    both read."""
    replicated, rows = [], []
    for name, param in model.named_parameters():
        if not getattr(param, "tensor_model_parallel", False):
            replicated.append(_pattern(name))
        elif param.partition_dim == 1:
            rows.append(_pattern(name))
    return {"universal_checkpoint_version": 0.4,
            "tp_replicated_parameter_patterns": sorted(set(replicated)),
            "parameter_with_row_parallelism_patterns": sorted(set(rows))}


def tp_merge_dim(name: str, info: dict) -> int | None:
    """The dimension along which TP shards of parameter ``name`` join into the whole one,
    by a checkpoint's ``info``; None for a replicated parameter."""
    if any(re.match(p, name) for p in info["tp_replicated_parameter_patterns"]):
        return None
    return 1 if any(re.match(p, name) for p in info["parameter_with_row_parallelism_patterns"]) \
        else 0


def write_layout(tag_dir: Path, layout: dict) -> None:
    (tag_dir / LAYOUT).write_text(json.dumps(layout))


def read_layout(tag_dir: Path) -> dict:
    return json.loads((tag_dir / LAYOUT).read_text())


def stage_family(stage: int) -> str:
    """Universal checkpoints load across stages of one family only (measured)."""
    return "3" if stage == 3 else "1-2" if stage else "0"


def needs_conversion(saved: dict, now: dict) -> bool:
    return saved["zero_stage"] > 0 and saved["data_parallel"] != now["data_parallel"]


def convert(root: Path, tag: str) -> str:
    """Write ``<tag>_universal`` beside ``tag`` (once) and return its name. Run on one rank
    with every rank's files on its filesystem."""
    target = root / f"{tag}_universal"
    if (target / "zero" / "optimizer_state.pt").is_file():
        return target.name
    staged = root / f".{tag}_staged"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(root / tag, staged)
    for path in staged.glob("*model_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        module = state.get("module")
        if isinstance(module, dict):
            state["module"] = {k: v for k, v in module.items() if v is not None}
            torch.save(state, path)
    shutil.rmtree(target, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
         str(staged), "--output_folder", str(target), "--num_extract_workers", "1",
         "--num_merge_workers", "1"], capture_output=True, text=True)
    shutil.rmtree(staged, ignore_errors=True)
    if out.returncode != 0:
        raise RuntimeError(f"converting {root / tag} to a universal checkpoint failed:\n"
                           f"{out.stderr[-2000:]}")
    return target.name
