#!/usr/bin/env bash
# The CoPE paper's tasks of docs/results.md at CPU scale, from a fresh clone (after
# `launch/bootstrap.sh test --co -q` or the demo has made .venv); the language-modelling rows
# are the sweep configs/sweeps/pe_ablation_cpu.yaml. Stages run one after another:
#   docs/ablation_cpu.sh flipflop  # Flip-Flop at reduced size and steps, 5 PEs
#   docs/ablation_cpu.sh counting  # Counting with 1 variable, reduced, 5 PEs
#   docs/ablation_cpu.sh selective # Selective Copy, the paper's model, 800 of 100K steps
#   docs/ablation_cpu.sh report    # tables and plots into docs/results/
# PES and SEEDS choose the rows, e.g. PES="cope fox stickbreaking" SEEDS="default 2" for CoPE
# and its contextual peers with two seeds, which `report` also puts side by side (*_peers).
set -euo pipefail
cd "$(dirname "$0")/.."
CM=".venv/bin/python -m cope_megatron"
OUT=${OUT:-runs/ablation}
PES=${PES:-"nope learned rope alibi cope"}
COMMON="logging.wandb=disabled logging.progress=false"
stage=${1:?usage: docs/ablation_cpu.sh flipflop|counting|selective|report}
SEEDS=${SEEDS:-default}  # task runs' train.seed; "default": the config's (1234)
task() {  # task NAME CONFIG-AND-OVERRIDES: prep once, then one run per PE and seed
  local name=$1; shift
  $CM prep "$@" $COMMON
  for seed in $SEEDS; do for pe in $PES; do
    if [ "$seed" = default ]; then dir=$OUT/$name-$pe; set_seed=""
    else dir=$OUT/$name-$pe-s$seed; set_seed="train.seed=$seed"; fi
    [ -f "$dir/eval.json" ] || $CM train "$@" configs/pe/$pe.yaml $set_seed run.dir=$dir $COMMON
  done; done
}
case "$stage" in
  flipflop)
    # The paper's task and batch; a smaller model (2 layers, dim 128), 800 of 10K steps.
    task flipflop configs/tasks/flipflop.yaml task.train_samples=12800 model.num_layers=2 \
      model.hidden_size=128 train.steps=800 train.lr=1.0e-3 train.warmup_steps=50 ;;
  counting)
    # 1 variable, the paper's data; 2 layers, dim 128, batch 16, 300 steps at lr 1e-3.
    task counting configs/tasks/counting.yaml model.num_layers=2 model.hidden_size=128 \
      train.micro_batch_size=16 train.steps=300 train.lr=1.0e-3 train.min_lr=1.0e-4 \
      train.warmup_steps=50 ;;
  selective)
    # The paper's model (2 layers, dim 64, 2 heads) and Flip-Flop's batch; 800 of 100K steps.
    task selective_copy configs/tasks/selective_copy.yaml task.train_samples=12800 \
      train.steps=800 train.lr=1.0e-3 train.warmup_steps=50 ;;
  report)
    $CM report $OUT/flipflop-* --out docs/results/flipflop
    $CM report $OUT/counting-* --out docs/results/counting
    $CM report $OUT/selective_copy-* --out docs/results/selective_copy
    for name in flipflop counting; do  # CoPE and its contextual peers, where they ran
      peers=$(ls -d "$OUT/$name"-{cope,fox,stickbreaking}{,-s*} 2>/dev/null || true)
      [ -z "$peers" ] || $CM report $peers --out "docs/results/${name}_peers"
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
