#!/usr/bin/env bash
# DeepSpeed's launcher over a hostfile (one "host slots=N" line per node; it starts the
# processes over ssh/pdsh).
#   HOSTFILE=hosts.txt launch/deepspeed_hostfile.sh configs/model/760m.yaml zero.stage=2
#   DRY_RUN=1 ...   lists every host and slot, the resolved config and the command
set -euo pipefail
source "$(dirname "$0")/common.sh"
HOSTFILE=${HOSTFILE:?set HOSTFILE (lines of "host slots=N")}
[ -f "$HOSTFILE" ] || { echo "error: HOSTFILE $HOSTFILE does not exist" >&2; exit 2; }
world=0
while read -r host slots _; do
  case "$host" in ''|'#'*) continue ;; esac
  n=${slots#slots=}
  [[ "$slots" == slots=* && "$n" =~ ^[0-9]+$ ]] || {
    echo "error: $HOSTFILE: '$host $slots' is not 'host slots=N'" >&2; exit 2; }
  [ "${DRY_RUN:-0}" = 1 ] && echo "host $host: slots 0-$((n - 1))"
  world=$((world + n))
done < "$HOSTFILE"
[ "$world" -gt 0 ] || { echo "error: $HOSTFILE lists no hosts" >&2; exit 2; }
check_run "$world" "$@"
run_or_print deepspeed --hostfile "$HOSTFILE" --no_local_rank --module cope_megatron "train" "$@"
