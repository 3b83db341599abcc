"""A killed trainer leaves no data-loader workers behind: they are forked from a fork
server (their parent), so they watch the trainer's own process."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

CHILD = textwrap.dedent("""
    import sys, time
    from cope_megatron.data.format import read_manifest
    from cope_megatron.data.loader import ResumableLoader
    from cope_megatron.data.source import StreamSpec, split_shards
    shards = sys.argv[1]
    m = read_manifest(shards)
    spec = StreamSpec(shards=split_shards(shards, m, "train"), seq_len=m["seq_len"],
                      dtype=m["dtype"], tokenizer_sha256=m["tokenizer_sha256"], seed=3,
                      micro_batch_size=2, shuffle_buffer=16, num_workers=2)
    loader = ResumableLoader(spec)
    next(loader)
    print(*(w.pid for w in loader._it._workers), flush=True)
    time.sleep(600)
""")


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.integration
def test_workers_exit_when_the_trainer_is_killed(prepared):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(prepared[0])],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = [int(pid) for pid in child.stdout.readline().split()]
    assert len(workers) == 2 and not any(gone(w) for w in workers)
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 15
    while not all(gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(w) for w in workers), workers
