#!/usr/bin/env bash
# Single-node training through torchrun.  NGPU processes; extra args are configs/overrides.
#   NGPU=2 launch/train.sh configs/model/debug.yaml configs/parallel/tp2.yaml train.steps=50
set -euo pipefail
NGPU=${NGPU:-1}
exec torchrun --standalone --nproc-per-node "$NGPU" -m cope_megatron.train "$@"
