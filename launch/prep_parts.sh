#!/usr/bin/env bash
# SLURM: prep a corpus across nodes (cope_megatron/data/prep/parts.py) as three jobs:
#   1. the set-up on one node (the tokenizer: trained on the whole corpus, or data.tokenizer),
#   2. a job array of PARTS tasks, task I running `prep --part I --parts PARTS`,
#   3. the merge (the last shards and manifest.json), once every part has succeeded.
#   PARTS=64 bash launch/prep_parts.sh configs/data/fineweb.yaml data.shards=/shared/fw
#   (from the checkout's root, on a login node; data.shards on a file system all nodes share)
#   DRY_RUN=1 ...   prints the three sbatch commands instead of submitting them.
# SBATCH_ARGS (e.g. "--partition cpu --cpus-per-task 32 --time 12:00:00") go to every job;
# set data.prep_workers to the cores a task gets. A failed part fails the array and the
# merge never starts; resubmit the array (finished parts return at once), then the merge.
set -euo pipefail
source launch/common.sh
PARTS=${PARTS:?set PARTS, the number of parts (array tasks)}
read -r -a extra <<< "${SBATCH_ARGS:-}"
prep=$(printf '%q ' "$PYTHON" -m cope_megatron prep "$@" --parts "$PARTS")

submit() {  # submit NAME ARGS...: the job's id (DRY_RUN=1: print the command; id NAME)
  local name=$1; shift
  if [ "${DRY_RUN:-0}" = 1 ]; then
    print_command sbatch --job-name "$name" "$@" >&2; echo "$name"
  else
    sbatch --parsable --job-name "$name" "$@"
  fi
}

setup=$(submit prep-setup "${extra[@]}" --ntasks 1 --wrap "$prep")
parts=$(submit prep-part "${extra[@]}" --ntasks 1 --dependency "afterok:$setup" \
  --array "0-$((PARTS - 1))" --wrap "$prep --part \$SLURM_ARRAY_TASK_ID")
merge=$(submit prep-merge "${extra[@]}" --ntasks 1 --dependency "afterok:$parts" \
  --wrap "$prep --merge")
echo "set-up job $setup, parts array $parts, merge job $merge"
