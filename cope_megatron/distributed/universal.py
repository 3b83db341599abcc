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
REPLICATED = [r".*layernorm\.(weight|bias)$", r".*linear_proj\.bias$", r".*linear_fc2\.bias$"]
ROW_PARALLEL = [r".*linear_proj\.weight$", r".*linear_fc2\.weight$"]


def checkpoint_info(model: torch.nn.Module) -> dict:
    """``universal_checkpoint_info`` for our GPT: its patterns must each match a parameter,
    so the PE-specific ones are added only where the model has them."""
    names = [n for n, _ in model.named_parameters()]
    replicated = list(REPLICATED)
    for pattern in (r"embedding\.position_embeddings\.weight",
                    r".*core_attention\.attention\.table$"):
        if any(re.match(pattern, n) for n in names):
            replicated.append(pattern)
    return {"universal_checkpoint_version": 0.4, "tp_replicated_parameter_patterns": replicated,
            "parameter_with_row_parallelism_patterns": ROW_PARALLEL}


def write_layout(tag_dir: Path, layout: dict) -> None:
    (tag_dir / LAYOUT).write_text(json.dumps(layout))


def read_layout(tag_dir: Path) -> dict | None:
    path = tag_dir / LAYOUT
    return json.loads(path.read_text()) if path.is_file() else None


def stage_family(stage: int) -> str:
    """Universal checkpoints load across stages of one family only (measured)."""
    return "3" if stage == 3 else "1-2" if stage else "0"


def needs_conversion(saved: dict | None, now: dict) -> bool:
    return (saved is not None and saved["zero_stage"] > 0
            and saved["data_parallel"] != now["data_parallel"])


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
