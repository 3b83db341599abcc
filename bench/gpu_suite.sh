#!/usr/bin/env bash
# One prepared GPU check (issue 28): run once on the lent GPU machine, from the project
# root, with .gpu_wheels carried (bench/gpu_wheels.sh packs it); docs/GPU.md gives the call.
#
#   bash bench/gpu_suite.sh                    # on the GPU machine
#   GPU_SUITE_DRY=1 bash bench/gpu_suite.sh    # anywhere: every stage at CPU size, no install
#
# Stages, each under its own budget (seconds on one H100; 490 in all, so that the machine's
# start, this call and one stage again fit in the session's 15 minutes):
#   install  the carried wheels into /tmp/site (GPU_SUITE_SITE)                      30
#   a tests  pytest -m gpu: the kernel tests (Triton, the chunked ops, FlexAttention's
#            bias kernels) in 6 processes where xdist is, the training tests beside
#            them in 3; failures go on                                              140
#   b op     bench/cope_op.py at 2k/8k/32k, bf16, 16 heads x 128, each call against
#            SDPA flash: Triton CoPE dense and sparse, then the chunked op (CUDA's
#            default), then ALiBi and T5 (FlexAttention, materialized bias)         130
#   c train  bench/train_throughput.py, 125M and 1.3B: RoPE, CoPE (chunked, Triton),
#            ALiBi (flex, materialized), RoPE with fusions on: tokens/s, MFU, peak
#            memory                                                                  150
#   d memory bench/activation_memory.py: the 125M activation estimate against the
#            allocator                                                                40
# Each stage runs its most wanted cases first, and every benchmark prints its rows as
# they finish and its table of what finished when its time runs out, so a cut keeps them.
# A stage over its budget is cut ("cut"), one that exits non-zero "failed"; either way the
# next stage runs. After every stage gpu_suite.json is rewritten, so what finished is kept
# even if the device's own limit ends the call.
#
# Environment: OUT (default ./gpu_suite_out) receives gpu_tests.txt (and, where stage a
# was cut, gpu_tests_training.txt),
# results_cope_op_gpu.txt, results_train_throughput_gpu.txt,
# results_activation_memory_gpu.txt (each stage's table), gpu_suite.log (every stage's
# stderr) and gpu_suite.json. GPU_SUITE_STAGES="a c" runs only those stages;
# GPU_SUITE_BUDGET_<INSTALL|A|B|C|D>=seconds overrides a budget; GPU_SUITE_PYTHON picks
# the interpreter (default python3); GPU_SUITE_WHEELS the wheel folder (.gpu_wheels).
set -euo pipefail

# Variants that wait on features not built yet, reported "not available" while empty;
# each is a one-line change when its feature lands.
# c: RoPE with the fusions on (model/fusions.py AUTO_ON_CUDA waits on them): the chunked
# loss alone, then with the compiled layers too; the difference prices each.
FUSED_VARIANTS="rope:fusion.cross_entropy=chunked
  rope:fusion.cross_entropy=chunked,fusion.layers=compile"
BIAS_KERNEL_IMPLS="alibi_flex t5_flex"  # b: bench/cope_op.py impls of ALiBi and T5 on FlexAttention

cd "$(dirname "$0")/.."
DRY=${GPU_SUITE_DRY:-0}
PY=${GPU_SUITE_PYTHON:-python3}
OUT=${OUT:-gpu_suite_out}
WHEELS=${GPU_SUITE_WHEELS:-.gpu_wheels}
SITE=${GPU_SUITE_SITE:-/tmp/site}
STAGES=${GPU_SUITE_STAGES:-a b c d}
mkdir -p "$OUT"
LOG=$OUT/gpu_suite.log
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  # CPU size: the same stages and files in about a minute.
  export TRITON_INTERPRET=1  # Triton kernels run on the CPU only in its interpreter
  OP_ARGS=(--seqs 64 --heads 2 --head-dim 16 --npos 8 --dtype float32 --reps 1)
  MODELS=("configs/model/debug.yaml")
  TRAIN_ARGS=(--steps 2 --warmup 1)
  TRAIN_VARIANTS=(rope)  # CoPE trains in tests/test_train.py; here the stage itself is tested
  # Compiling layers takes 10-30 s of CPU a process: tests/test_fusions.py covers it.
  FUSED_VARIANTS="rope:fusion.cross_entropy=chunked"
  MEMORY_MODEL=(configs/model/debug.yaml)
else
  OP_ARGS=(--seqs 2048 8192 32768 --heads 16 --head-dim 128 --npos 64 --dtype bfloat16 --reps 5)
  MODELS=("configs/model/125m.yaml train.micro_batch_size=8"
          "configs/model/1.3b.yaml train.micro_batch_size=4")
  TRAIN_ARGS=(--steps 6 --warmup 2)
  # The most wanted first: a cut model keeps the rows it finished.
  TRAIN_VARIANTS=(rope cope:pe.cope.impl=chunked cope:pe.cope.impl=triton
                  alibi:pe.bias_kernel=flex alibi)
  MEMORY_MODEL=(configs/model/125m.yaml train.micro_batch_size=2)
fi

stage_tests() {
  # -v names each test as it starts: one that never ends is where a crash (or the cut) hit.
  local rc=0 kernels=() training=() pid
  local common=(tests/test_gpu.py -m gpu -o addopts= -v -rfE -p no:cacheprovider)
  # Each kernel test compiles its own variants (10-30 s of CPU apiece): xdist's processes
  # overlap the compiles, and one that crashes is replaced while the others go on. The
  # training tests run beside them into a file of their own (two runs' lines would
  # interleave), appended once both are done; the activation test is stage d's measure.
  "$PY" -c "import xdist" 2>/dev/null && kernels=(-n 6) && training=(-n 3)
  # Inductor's compile pool is as large as the core count in every process: 9 of them
  # would start over a hundred compile workers on 16 cores.
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
  "$PY" -m pytest "${common[@]}" "${training[@]}" --durations=10 \
    -k "not (kernels or chunked_op or activation_estimate)" >"$OUT/gpu_tests_training.txt" 2>&1 &
  pid=$!
  trap 'wait "$pid"; exit 124' TERM  # cut: the training tests' file stays, and is read too
  "$PY" -m pytest "${common[@]}" "${kernels[@]}" -k "kernels or chunked_op" || rc=$?
  wait "$pid" || rc=$?
  cat "$OUT/gpu_tests_training.txt" && rm "$OUT/gpu_tests_training.txt"
  return "$rc"
}

stage_op() {
  local rc=0
  # One call per kind, the most wanted first (the figures issue 14 waits on, then the
  # path CoPE takes on CUDA by default), each against its own SDPA.
  "$PY" bench/cope_op.py "${OP_ARGS[@]}" --gates dense sparse --impls triton || rc=$?
  "$PY" bench/cope_op.py "${OP_ARGS[@]}" --gates dense --impls chunked || rc=$?
  # shellcheck disable=SC2086  # BIAS_KERNEL_IMPLS is a list of names
  "$PY" bench/cope_op.py "${OP_ARGS[@]}" --gates dense --impls $BIAS_KERNEL_IMPLS alibi t5 \
    || rc=$?
  return "$rc"
}

stage_train() {
  local rc=0 model variants=("${TRAIN_VARIANTS[@]}")
  # shellcheck disable=SC2206  # FUSED_VARIANTS is a list of variants
  variants+=($FUSED_VARIANTS)
  local left=${#MODELS[@]} share
  for model in "${MODELS[@]}"; do
    # Each model gets an equal share of the time left, so a slow one cannot starve the
    # next; stopped, it still prints the rows it finished. --foreground: the stage's own
    # timeout must still reach every process here.
    share=$(((STAGE_BUDGET - SECONDS) / left)) && left=$((left - 1))
    [ "$share" -gt 0 ] || share=1  # timeout 0 would mean none
    # shellcheck disable=SC2086  # a model is its config file and its overrides
    timeout --foreground "$share" \
      "$PY" bench/train_throughput.py $model "${TRAIN_ARGS[@]}" --pes "${variants[@]}" || rc=$?
  done
  return "$rc"
}

stage_memory() {
  "$PY" bench/activation_memory.py "${MEMORY_MODEL[@]}" --pes rope alibi cope
}

stage_install() {
  [ "$DRY" = 1 ] && { echo "dry run: nothing installed"; return 0; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
}

# Re-entry: a stage runs in its own process so that `timeout` can end it, children included.
if [ "${1:-}" = --stage ]; then
  # The budget's TERM reaches every process of the stage. Trapped, this shell waits for its
  # benchmark to print what finished before it ends, and `timeout` waits for this shell, so
  # its --kill-after still holds for a child that does not stop.
  trap 'exit 124' TERM
  "stage_$2"
  exit
fi

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
RECORDS=$SCRATCH/records
: >"$RECORDS"
: >"$LOG"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# record LETTER NAME STATUS EXIT ELAPSED BUDGET TABLE NOT_AVAILABLE, then gpu_suite.json anew.
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RECORDS"
  "$PY" bench/gpu_suite_report.py write "$SCRATCH/env.json" "$RECORDS" "$OUT"
}

# run_stage LETTER NAME BUDGET TABLE NOT_AVAILABLE: one stage, recorded and reported.
run_stage() {
  local letter=$1 name=$2 budget=$3 table=$4 missing=$5 rc=0 status start
  local var=GPU_SUITE_BUDGET_${letter^^}
  budget=${!var:-$budget}
  if [ "$letter" != install ] && [[ " $STAGES " != *" $letter "* ]]; then
    record "$letter" "$name" skipped 0 0 "$budget" "" "$missing"
    return
  fi
  echo "== $letter $name (budget ${budget}s)" | tee -a "$LOG"
  local dest=$LOG
  [ -n "$table" ] && { dest=$OUT/$table; : >"$dest"; }
  start=$(now)
  STAGE_BUDGET=$budget timeout --kill-after=10 "$budget" bash "$0" --stage "$name" \
    >>"$dest" 2>>"$LOG" || rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=cut ;;
    *) status=failed ;;
  esac
  echo "== $letter $name: $status (exit $rc)" | tee -a "$LOG"
  record "$letter" "$name" "$status" "$rc" "$(elapsed "$start")" "$budget" "$table" "$missing"
}

"$PY" bench/gpu_suite_report.py probe >"$SCRATCH/env.json"  # torch and Triton are there
run_stage install install 30 "" ""
if [ "$DRY" != 1 ]; then
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

bias_missing=""
[ -z "$BIAS_KERNEL_IMPLS" ] && bias_missing="alibi on the chosen kernel;t5 on the chosen kernel"
fused_missing=""
[ -z "$FUSED_VARIANTS" ] && fused_missing="fusions on"

run_stage a tests 140 gpu_tests.txt ""
run_stage b op 130 results_cope_op_gpu.txt "$bias_missing"
run_stage c train 150 results_train_throughput_gpu.txt "$fused_missing"
run_stage d memory 40 results_activation_memory_gpu.txt ""
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
