"""Every rank checks, once the process group is up, that all ranks resolved the same config
and read the same data manifest: nodes with different checkouts or data would otherwise
train different things in lockstep until something breaks far from the cause."""

from __future__ import annotations

import hashlib
import json
import socket

import torch.distributed as dist

from cope_megatron.config import Config, ConfigError, to_dict


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
