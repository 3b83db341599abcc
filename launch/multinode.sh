#!/usr/bin/env bash
# Several nodes, torchrun on each: run this on every node with the same arguments, the same
# MASTER_ADDR (node 0's address) and its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 launch/multinode.sh configs/model/1.3b.yaml
#   DRY_RUN=1 ...   prints the resolved config and the command instead of running them
#   RDZV_TIMEOUT=600  seconds a node waits for node 0's rendezvous store (torchrun's default):
#                   a node whose node 0 never comes up (it refused its config, or its
#                   MASTER_PORT was taken) gives up after it, exit non-zero, with no worker
set -euo pipefail
source "$(dirname "$0")/common.sh"
NGPU=${NGPU:-8}; NNODES=${NNODES:?set NNODES (nodes in the run)}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 on the node at MASTER_ADDR, then 1, 2, ...)}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR (the address of node 0)}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
check_run "$((NNODES * NGPU))" "$@"
run_or_print "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$NGPU" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --rdzv-conf "timeout=$RDZV_TIMEOUT" -m cope_megatron train "$@"
