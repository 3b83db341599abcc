#!/usr/bin/env bash
# DeepSpeed launcher over a hostfile ("host slots=8" per line).
#   HOSTFILE=hosts.txt launch/deepspeed_hostfile.sh configs/model/760m.yaml zero.stage=2
set -euo pipefail
HOSTFILE=${HOSTFILE:?set HOSTFILE}
exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --module cope_megatron.train "$@"
