#!/usr/bin/env bash
# Packs into .gpu_wheels/ (ignored by git) the wheels that the lent GPU machine lacks, for
# bench/gpu_suite.sh to install there. That machine has Python 3.12, torch, Triton, numpy,
# SentencePiece, pytest (with xdist), psutil, einops, ninja, msgpack, py-cpuinfo and
# nvidia-ml-py, but not megatron-core, DeepSpeed, webdataset or pydantic, and no internet.
# Versions are the ones the project's virtual environment runs here (the README set-up):
#
#   VENV=.venv bash bench/gpu_wheels.sh     # from the project root; about 13 MB
#
# Every device call then names .gpu_wheels in carry (docs/GPU.md). What travels (the tree
# and the carried wheels) must stay under 64 MiB: the script refuses a larger folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEST=.gpu_wheels
MAX_MIB=48  # the tree is about 1 MB; the rest of the 64 MiB is headroom

[ -x "$VENV/bin/python" ] || { echo "no $VENV/bin/python: run the README set-up, or set VENV" >&2; exit 1; }

# Pure-Python or manylinux wheels for CPython 3.12 on x86-64, with their needs that the
# machine lacks named one by one (--no-deps: one version of each, none of what it has).
NEEDED=(megatron-core webdataset braceexpand hjson pydantic pydantic-core annotated-types
        typing-inspection typing-extensions zstandard)
mapfile -t PINNED < <("$VENV/bin/python" - "${NEEDED[@]}" <<'PY'
import importlib.metadata as m
import sys

for name in sys.argv[1:]:
    print(f"{name}=={m.version(name)}")
PY
)
DEEPSPEED=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')

rm -rf "$DEST" && mkdir "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$DEST" "${PINNED[@]}"
# DeepSpeed ships only a source distribution: build a pure-Python wheel (no ops compiled;
# they are built just in time where needed, and our runs need none).
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
  "deepspeed==$DEEPSPEED"

mib=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) wheels, ${mib} MiB"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "$DEST is over ${MAX_MIB} MiB: the device call would not carry it" >&2
  exit 1
fi
