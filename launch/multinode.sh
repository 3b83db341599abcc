#!/usr/bin/env bash
# Multi-node training: run this on every node with the same MASTER_ADDR.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 launch/multinode.sh configs/model/1.3b.yaml ...
set -euo pipefail
NGPU=${NGPU:-8}; NNODES=${NNODES:?set NNODES}; NODE_RANK=${NODE_RANK:?set NODE_RANK}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}; MASTER_PORT=${MASTER_PORT:-29500}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NGPU" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m cope_megatron.train "$@"
