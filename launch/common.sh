# Sourced by the launch scripts: the checks and the dry run they share.
# PYTHON: the interpreter with cope-megatron installed (default: python).
PYTHON=${PYTHON:-python}

# check_run WORLD ARGS...: exit 2 unless the run can start on WORLD processes
# (TP x CP must divide it; configs valid; data prepared). DRY_RUN=1 prints the resolved
# config too.
check_run() {
  local world=$1; shift
  if [ "${DRY_RUN:-0}" = 1 ]; then
    "$PYTHON" -m cope_megatron.launch.precheck --world "$world" --print-config "$@" || exit 2
  else
    "$PYTHON" -m cope_megatron.launch.precheck --world "$world" "$@" || exit 2
  fi
}

# print_command COMMAND...: one line, shell-quoted (what DRY_RUN=1 shows).
print_command() {
  printf '%q ' "$@"; printf '\n'
}

# run_or_print COMMAND...: run it, or with DRY_RUN=1 print it.
run_or_print() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    print_command "$@"
  else
    exec "$@"
  fi
}
