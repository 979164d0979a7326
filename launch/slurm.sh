#!/usr/bin/env bash
# Submits launch/slurm.sbatch: one llmlab process per GPU on --nodes nodes, requeued until done.
#
#   launch/slurm.sh --nodes=2 --gpus_per_node=8 --partition=gpu --time=12:00:00 \
#       -- train --config=configs/base.py --workdir=/shared/runs/r1
#
# Options (all --flag=value): --nodes (1), --gpus_per_node (8; also the tasks per node), --partition,
# --account, --qos, --time, --job_name (llmlab), --cpus_per_task, --python (interpreter on the nodes),
# --sbatch_arg=ARG (any other sbatch option, repeatable), --dry_run (print the sbatch command and the
# job script instead of submitting).
set -euo pipefail

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm.sbatch"

die() { echo "slurm.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

NODES=1 GPUS=8 JOB_NAME=llmlab DRY_RUN=0 PYTHON=
OPTIONAL=()   # sbatch options passed only when given
while (($#)); do
  case "$1" in
    --nodes=*) NODES=${1#*=} ;;
    --gpus_per_node=*) GPUS=${1#*=} ;;
    --job_name=*) JOB_NAME=${1#*=} ;;
    --partition=*|--account=*|--qos=*|--time=*) OPTIONAL+=("$1") ;;
    --cpus_per_task=*) OPTIONAL+=("--cpus-per-task=${1#*=}") ;;
    --python=*) PYTHON=${1#*=} ;;
    --sbatch_arg=*) OPTIONAL+=("${1#*=}") ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (options are --flag=value; llmlab's arguments go after '--'; see --help)" ;;
  esac
  shift
done
(($#)) || die "missing '-- ARGS' (what every task runs, e.g. -- train --config=... --workdir=/shared/...)"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes=$NODES: expected a positive integer"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node=$GPUS: expected a positive integer"
case " $* " in
  *" --workdir=/tmp"*) echo "slurm.sh: warning: a workdir under /tmp is node-local; requeued jobs will not find their checkpoints" >&2 ;;
  *" --workdir="*) ;;
  *) echo "slurm.sh: warning: no --workdir=...; it must be on storage shared by all nodes" >&2 ;;
esac

CMD=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" "${OPTIONAL[@]}")
[[ -z $PYTHON ]] || CMD+=(--export="ALL,LLMLAB_PYTHON=$PYTHON")
CMD+=("$SCRIPT" "$@")

if ((DRY_RUN)); then
  printf '+'; printf ' %q' "${CMD[@]}"; printf '\n'
  echo "# job script $SCRIPT (the options above override its #SBATCH defaults):"
  cat "$SCRIPT"
else
  "${CMD[@]}"
fi
