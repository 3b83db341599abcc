"""What the launch scripts (``launch/*.sh``) check before they start anything, and what
every rank checks once the process group is up.

Before: the world the script is about to start (nodes × processes per node) must be a
multiple of TP × CP, with every other setting valid; ``DRY_RUN=1`` prints the resolved
config. After: every rank must have resolved the same config and read the same data
manifest, or nodes with different checkouts or data would train different things in
lockstep until something breaks far from the cause.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
from pathlib import Path

import torch.distributed as dist
import yaml

from cope_megatron.config import (
    Config,
    ConfigError,
    load_config,
    to_dict,
    validate,
    validate_data_path,
)


def fingerprint(cfg: Config, manifest: dict) -> str:
    """A short hash of the resolved config and the data manifest. ``run.dir`` counts too:
    every node must write into the same run."""
    text = json.dumps({"config": to_dict(cfg), "manifest": manifest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_everywhere(cfg: Config, manifest: dict) -> None:
    """Raise ConfigError on every rank unless all ranks have the same config and manifest,
    naming the hosts that differ from rank 0."""
    mine = {"fingerprint": fingerprint(cfg, manifest), "host": socket.gethostname()}
    everyone: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    differ = sorted({e["host"] for e in everyone
                     if e["fingerprint"] != everyone[0]["fingerprint"]})
    if differ:
        raise ConfigError(
            f"run config or data manifest differ between nodes: {', '.join(differ)} resolved "
            f"another config or read another {cfg.data.shards}/manifest.json than rank 0 on "
            f"{everyone[0]['host']}; give every node the same checkout, configs, overrides "
            "and prepared data (a shared file system, or the same prep on each)")


def main(argv: list[str] | None = None) -> int:
    """``python -m cope_megatron.launch --world N [--print-config] CONFIG... [overrides]``:
    exit 2 with the fix when the run cannot start on N processes."""
    parser = argparse.ArgumentParser(prog="cope_megatron.launch")
    parser.add_argument("--world", type=int, required=True,
                        help="processes the launcher will start: nodes x per node")
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("sources", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.sources)
        validate(cfg, args.world)
        validate_data_path(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = cfg.parallel
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(f"layout: world {args.world} = TP {p.tensor} x CP {p.context} x DP "
          f"{args.world // (p.tensor * p.context)}; run dir {Path(cfg.run.dir)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
