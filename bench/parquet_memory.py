"""Peak memory of prep reading a large parquet file.

    python bench/parquet_memory.py [--gib 1] [--row-group-rows 10000] [--dir /tmp]

Writes a FineWeb-like parquet file (text, id, url, token_count; snappy, as pyarrow writes
by default) of about ``--gib`` GiB into ``--dir``, then, each in a fresh process, reads its
text as prep does (``prep._batches`` of ``prep._pieces``: row group by row group) and, for
contrast, whole with ``pyarrow.parquet.read_table``; reports each process's peak resident
memory (VmHWM, Linux) against the same process's after its imports. The file is deleted
after. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READERS = {
    "prep (row groups)": """
from collections import Counter
from cope_megatron.config import DataConfig
from cope_megatron.data.prep import prep
data = DataConfig(corpus=[PATH])
chars = 0
for batch in prep._batches(prep._pieces([Path(PATH)], data, Counter())):
    chars += sum(len(p.text) for p in batch)
""",
    "read_table (whole)": """
import pyarrow.parquet as pq
chars = sum(len(t) for t in pq.read_table(PATH, columns=["text"]).column("text").to_pylist())
""",
}

MEASURE = """
import sys, time
from pathlib import Path
import pyarrow, pyarrow.parquet
import cope_megatron.data.columnar, cope_megatron.data.prep.prep
def peak_kib():  # VmHWM: unlike ru_maxrss, not inherited from the parent across exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
PATH = sys.argv[1]
base = peak_kib()
began = time.perf_counter()
{code}
print(base, peak_kib(), chars, time.perf_counter() - began)
"""


def write_parquet(path: Path, gib: float, group_rows: int, seed: int = 0) -> dict:
    """Row groups of ``group_rows`` documents of random words until the file holds ``gib``
    GiB (random words from a 50k-word vocabulary barely compress: the file's size is about
    its text's)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(50_000)])
    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string()),
                        ("token_count", pa.int64())])
    rows = groups = text_bytes = 0
    with pq.ParquetWriter(path, schema) as writer:
        while path.stat().st_size < gib * 2**30:
            lengths = rng.integers(100, 1500, group_rows)
            words = vocab[rng.integers(0, len(vocab), lengths.sum())]
            cuts = np.cumsum(lengths)[:-1]
            texts = [" ".join(doc) for doc in np.split(words, cuts)]
            ids = [f"<urn:uuid:{rows + i}>" for i in range(group_rows)]
            writer.write_table(pa.table({
                "text": texts, "id": ids, "url": [f"https://example.org/{i}" for i in ids],
                "token_count": lengths}, schema=schema))
            rows += group_rows
            groups += 1
            text_bytes += sum(len(t) for t in texts)
    return {"rows": rows, "row_groups": groups, "text_gib": round(text_bytes / 2**30, 3),
            "file_gib": round(path.stat().st_size / 2**30, 3)}


def measure(path: Path, code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", MEASURE.format(code=code), str(path)],
                         capture_output=True, text=True, env=env, check=True)
    base, peak, chars, seconds = out.stdout.split()
    return {"base_mib": round(int(base) / 1024), "peak_mib": round(int(peak) / 1024),
            "added_mib": round((int(peak) - int(base)) / 1024), "chars": int(chars),
            "seconds": round(float(seconds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--row-group-rows", type=int, default=10_000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    path = Path(args.dir) / f"parquet_memory_{os.getpid()}.parquet"
    try:
        began = time.perf_counter()
        made = write_parquet(path, args.gib, args.row_group_rows)
        made["write_s"] = round(time.perf_counter() - began, 1)
        results = {name: measure(path, code) for name, code in READERS.items()}
    finally:
        path.unlink(missing_ok=True)
    print(f"file: {made['file_gib']} GiB parquet, {made['text_gib']} GiB of text, "
          f"{made['rows']} rows in {made['row_groups']} row groups of {args.row_group_rows}")
    print(f"{'reader':<20} {'after imports':>14} {'peak':>10} {'added':>10} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<20} {r['base_mib']:>10} MiB {r['peak_mib']:>6} MiB "
              f"{r['added_mib']:>6} MiB {r['seconds']:>8}")
    print(json.dumps({"file": made, "row_group_rows": args.row_group_rows, **results}))


if __name__ == "__main__":
    main()
