#!/usr/bin/env bash
# One node: NGPU processes through torchrun; arguments are configs and key=value overrides.
#   NGPU=2 launch/train.sh configs/model/debug.yaml configs/parallel/tp2.yaml train.steps=50
#   DRY_RUN=1 ...   prints the resolved config and the command instead of running them
set -euo pipefail
source "$(dirname "$0")/common.sh"
NGPU=${NGPU:-1}
check_run "$NGPU" "$@"
run_or_print "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
  -m cope_megatron train "$@"
