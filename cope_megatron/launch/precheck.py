"""``python -m cope_megatron.launch.precheck --world N CONFIG... [overrides]``: what the
launch scripts (``launch/*.sh``) check before they start anything. The world the script is
about to start (nodes × processes per node) must be a multiple of TP × CP, with every other
setting valid; ``--print-config`` prints the resolved config (``DRY_RUN=1``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from cope_megatron.config import Layout, load_config, to_dict
from cope_megatron.errors import UserError
from cope_megatron.startup import check


def main(argv: list[str] | None = None) -> int:
    """``python -m cope_megatron.launch.precheck --world N [--print-config] CONFIG... [overrides]``:
    exit 2 with the fix when the run cannot start on N processes."""
    parser = argparse.ArgumentParser(prog="cope_megatron.launch.precheck")
    parser.add_argument("--world", type=int, required=True,
                        help="processes the launcher will start: nodes x per node")
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("sources", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.sources)
        check(cfg, args.world)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layout = Layout.of(cfg, args.world)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(f"layout: world {args.world} = TP {layout.tensor} x CP {layout.context} x DP "
          f"{layout.data}; run dir {Path(cfg.run.dir)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
