#!/usr/bin/env bash
# Runs `python3 -m llmlab ARGS` on every worker of a Cloud TPU VM slice; recreates the slice when it is
# preempted and runs again (the run resumes from the last checkpoint in its gs:// workdir).
#
#   launch/tpu.sh --name=llm1 --zone=us-west4-a --accelerator=v5litepod-16 --version=v2-alpha-tpuv5-lite \
#       --spot -- train --config=configs/base.py --workdir=gs://my-bucket/runs/llm1
#
# Each attempt: make sure the slice exists and is READY (reusing one of that name, else creating it);
# copy the package and any local --config=FILE to every worker and pip install it there; run llmlab on
# all workers at once (jax.distributed initialises itself from the TPU metadata). If llmlab fails while
# the slice is healthy, that is a real error: no retry. If the slice is gone, preempted or suspended, it
# is deleted, recreated and the run restarted, at most --retries times. Exit status 75 (a hung run ended
# by its watchdog, or storage that stopped answering; docs/reliability.md) is restartable: the run is
# started again on the same slice, and these restarts count against --retries too.
#
# Options (all --flag=value):
#   --name, --zone, --accelerator (e.g. v5litepod-16), --version (TPU runtime, e.g. v2-alpha-tpuv5-lite)
#   --project          gcloud project (default: gcloud's configured one)
#   --queued           create through `queued-resources create` (waits in the queue for capacity)
#   --spot             Spot capacity (cheap, preemptible at any time)
#   --best_effort      best-effort queued capacity (implies --queued; uses `gcloud alpha`)
#   --preemptible      legacy preemptible TPU VM (not with --queued)
#   --install          git+URL, a wheel/sdist file, or a project directory built into a wheel here
#                      (default: this checkout)
#   --pip_extra        extra requirement installed alongside (default: jax[tpu])
#   --env=KEY=VALUE    environment for llmlab on the workers (repeatable)
#                      LIBTPU_INIT_ARGS defaults to the TPU compiler flags of the public MaxText recipes
#                      (launch/README.md); your own LIBTPU_INIT_ARGS (here or as --env=) replaces them,
#                      an empty one leaves libtpu's defaults
#   --retries          slice recreations allowed (default 3)
#   --ready_timeout    seconds to wait for a READY slice per attempt (default 7200); --poll (default 30)
#   --delete_at_end    delete the slice after a successful run
#   --dry_run          print every command (one per line, prefixed '+ ') instead of running it
#
# The job lives as long as this script's ssh sessions: run it under tmux/screen/nohup.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=llmlab_dist  # relative to the worker's home, where ssh commands start

NAME= ZONE= ACCELERATOR= VERSION= PROJECT= INSTALL=$REPO_DIR PIP_EXTRA='jax[tpu]'
QUEUED=0 SPOT=0 BEST_EFFORT=0 PREEMPTIBLE=0 DELETE_AT_END=0 DRY_RUN=0
RETRIES=3 READY_TIMEOUT=7200 POLL=30
EXIT_HANG=75  # llmlab/watchdog.py: no step in train.hang_timeout_s, or a storage deadline passed
ENVS=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "tpu.sh: $*" >&2; exit 2; }     # bad invocation
fail() { echo "tpu.sh: $*" >&2; exit 1; }    # the job failed
log() { echo "==> $*" >&2; }

# One command as one copy-pasteable line: plain words as they are, anything else single-quoted.
show() {
  local words=() w
  for w in "$@"; do
    if [[ $w =~ ^[][A-Za-z0-9_./:=@%+,*~-]+$ ]]; then words+=("$w"); else words+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "+ ${words[*]}"
}

# Each argument shell-quoted and followed by a space; nothing for no arguments.
quoted() {
  (($#)) || return 0
  printf '%q ' "$@"
}

# Dry run: print the command. Otherwise: trace it to stderr and run it.
run() {
  if ((DRY_RUN)); then show "$@"; else show "$@" >&2; "$@"; fi
}

parse_args() {
  while (($#)); do
    case "$1" in
      --name=*) NAME=${1#*=} ;;
      --zone=*) ZONE=${1#*=} ;;
      --accelerator=*) ACCELERATOR=${1#*=} ;;
      --version=*) VERSION=${1#*=} ;;
      --project=*) PROJECT=${1#*=} ;;
      --install=*) INSTALL=${1#*=} ;;
      --pip_extra=*) PIP_EXTRA=${1#*=} ;;
      --env=*=*) ENVS+=("${1#*=}") ;;
      --retries=*) RETRIES=${1#*=} ;;
      --ready_timeout=*) READY_TIMEOUT=${1#*=} ;;
      --poll=*) POLL=${1#*=} ;;
      --queued) QUEUED=1 ;;
      --spot) SPOT=1 ;;
      --best_effort) BEST_EFFORT=1 QUEUED=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --delete_at_end) DELETE_AT_END=1 ;;
      --dry_run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; LLMLAB_ARGS=("$@"); return ;;
      *) die "unknown option '$1' (options are --flag=value; llmlab's arguments go after '--'; see --help)" ;;
    esac
    shift
  done
  die "missing '-- ARGS' (what to run on every worker, e.g. -- train --config=... --workdir=gs://...)"
}

check_args() {
  local flag
  for flag in NAME ZONE ACCELERATOR VERSION; do
    [[ -n ${!flag} ]] || die "--${flag,,}=... is required"
  done
  for flag in RETRIES READY_TIMEOUT POLL; do
    [[ ${!flag} =~ ^[0-9]+$ ]] || die "--${flag,,}=${!flag}: expected a non-negative integer"
  done
  ((${#LLMLAB_ARGS[@]})) || die "nothing to run after '--'"
  ((SPOT + BEST_EFFORT + PREEMPTIBLE <= 1)) || die "--spot, --best_effort and --preemptible exclude each other"
  ((!(QUEUED && PREEMPTIBLE))) || die "--preemptible is a TPU VM option; with --queued use --spot or --best_effort"
  if [[ " ${LLMLAB_ARGS[*]} " != *" --workdir=gs://"* ]]; then
    log "warning: no --workdir=gs://...; workers and recreated slices share only what is on GCS," \
        "so checkpoints elsewhere do not survive a preemption"
  fi
}

LOCATION=()          # --zone/--project for every gcloud call
QR=()                # the gcloud that handles queued resources (alpha for best-effort)
PACKAGE_FILES=()     # local files copied to $REMOTE_DIR/pkg/ on every worker
CONFIG_FILES=()      # local config files copied to $REMOTE_DIR/
PIP_SPEC=            # what pip installs on the workers
RUN_ARGS=()          # LLMLAB_ARGS with local config paths rewritten to their copies

setup() {
  LOCATION=(--zone="$ZONE")
  [[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")
  if ((BEST_EFFORT)); then QR=(gcloud alpha compute tpus queued-resources); else QR=(gcloud compute tpus queued-resources); fi
  local arg value path
  for arg in "${LLMLAB_ARGS[@]}"; do
    if [[ $arg == --config=* ]]; then
      value=${arg#--config=}
      path=${value%%:*}   # ml_collections style 'file.py:override' keeps its suffix
      if [[ -f $path ]]; then
        CONFIG_FILES+=("$path")
        arg="--config=$REMOTE_DIR/$(basename "$path")${value:${#path}}"
      fi
    fi
    RUN_ARGS+=("$arg")
  done
}

# Turns --install into PACKAGE_FILES/PIP_SPEC; builds the wheel of a project directory once, here.
prepare_package() {
  case $INSTALL in
    git+*|http://*|https://*) PIP_SPEC=$INSTALL ;;
    *.whl|*.tar.gz|*.zip)
      [[ -f $INSTALL ]] || die "--install=$INSTALL: no such file"
      PACKAGE_FILES=("$INSTALL") PIP_SPEC="$REMOTE_DIR/pkg/*" ;;
    *)
      [[ -f $INSTALL/pyproject.toml ]] || die "--install=$INSTALL: not a git+URL, wheel, sdist or directory with pyproject.toml"
      local wheel_dir="${TMPDIR:-/tmp}/llmlab-tpu-wheel"
      if ((!DRY_RUN)); then
        wheel_dir=$(mktemp -d)
        trap "rm -rf '$wheel_dir'" EXIT
      fi
      run python3 -m pip wheel --quiet --no-deps --wheel-dir="$wheel_dir" "$INSTALL"
      if ((DRY_RUN)); then PACKAGE_FILES=("$wheel_dir/*.whl"); else PACKAGE_FILES=("$wheel_dir"/*.whl); fi
      PIP_SPEC="$REMOTE_DIR/pkg/*" ;;
  esac
}

# Sets RAW_STATE (gcloud's word, empty when absent) and STATE: ready | pending | gone | dead.
DRY_STATE=   # what a dry run pretends `describe` printed
read_state() {
  if ((QUEUED)); then
    describe "${QR[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state.state)'
    # ACTIVE says capacity was granted; the node itself must be READY too.
    [[ $RAW_STATE != ACTIVE ]] || describe gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)'
  else
    describe gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)'
  fi
  case $RAW_STATE in
    '') STATE=gone ;;
    READY) STATE=ready ;;
    CREATING|STARTING|RESTARTING|REPAIRING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES|SUSPENDING|DELETING|UNKNOWN)
      STATE=pending ;;
    *) STATE=dead ;;  # PREEMPTED, TERMINATED, STOPPED, SUSPENDED, FAILED, ...
  esac
}

describe() {
  local out
  if ((DRY_RUN)); then show "$@"; RAW_STATE=$DRY_STATE; return; fi
  if out=$("$@" 2>&1); then
    RAW_STATE=$out
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
    RAW_STATE=
  else
    log "describe failed, will ask again: $out"
    RAW_STATE=UNKNOWN
  fi
}

create_slice() {
  local kind=()
  if ((QUEUED)); then
    ((SPOT)) && kind=(--spot)
    ((BEST_EFFORT)) && kind=(--best-effort)
    run "${QR[@]}" create "$NAME" --node-id="$NAME" "${LOCATION[@]}" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${kind[@]}"
  else
    ((SPOT)) && kind=(--spot)
    ((PREEMPTIBLE)) && kind=(--preemptible)
    run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
        --accelerator-type="$ACCELERATOR" --version="$VERSION" "${kind[@]}"
  fi
}

delete_slice() {
  if ((QUEUED)); then
    run "${QR[@]}" delete "$NAME" "${LOCATION[@]}" --force --quiet  # --force: the node too
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

# Waits (creating or replacing the slice as needed) until it is READY, at most --ready_timeout seconds.
ensure_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    read_state
    case $STATE in
      ready) log "slice $NAME is READY"; return 0 ;;
      gone)
        log "creating slice $NAME ($ACCELERATOR)"
        create_slice || log "create failed (capacity?); trying again in ${POLL}s"
        if ((DRY_RUN)); then DRY_STATE=READY; continue; fi ;;
      dead) log "slice $NAME is $RAW_STATE; deleting it"; delete_slice || log "delete failed; trying again" ;;
      pending) log "slice $NAME is $RAW_STATE; waiting" ;;
    esac
    ((SECONDS < deadline)) || fail "slice $NAME not READY after ${READY_TIMEOUT}s (last state: ${RAW_STATE:-absent})"
    sleep "$POLL"
  done
}

on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all \
      --ssh-flag=-oServerAliveInterval=60 --command="$1"
}

copy_to_workers() {  # copy_to_workers REMOTE_SUBDIR FILE...
  local dest=$1; shift
  (($#)) || return 0
  run gcloud compute tpus tpu-vm scp "$@" "$NAME:$dest" "${LOCATION[@]}" --worker=all
}

# Fresh files and a fresh install on every worker (a recreated slice starts empty).
install_on_workers() {
  local extra=() pkg
  [[ -z $PIP_EXTRA ]] || extra=("$PIP_EXTRA")
  pkg=$PIP_SPEC
  [[ $pkg == "$REMOTE_DIR/pkg/*" ]] || pkg=$(printf '%q' "$pkg")  # the glob is the worker's to expand
  on_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR/pkg" || return
  copy_to_workers "$REMOTE_DIR/pkg/" "${PACKAGE_FILES[@]}" || return
  copy_to_workers "$REMOTE_DIR/" "${CONFIG_FILES[@]}" || return
  # The second install replaces an installed copy of the same version number with this build.
  on_workers "python3 -m pip install --quiet --upgrade $pkg $(quoted "${extra[@]}")&& \
python3 -m pip install --quiet --force-reinstall --no-deps $pkg"
}

# TPU compiler flags of MaxText's public recipes: collective fusion + compute/collective overlap (the
# all-gathers of fsdp run under the matmuls), data-parallel all-reduce overlap, and a larger scoped VMEM
# for the fusions (v5p: 80 MiB as MaxText's v5p recipes; v5e/v6e: 96 MiB; v4: libtpu's default).
# llmlab/slices.py (what `llmlab plan --target` compiles with) keeps the same list; a test checks it.
default_libtpu_args() {
  local flags=(
    --xla_tpu_enable_async_collective_fusion=true
    --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
    --xla_tpu_enable_async_collective_fusion_multiple_steps=true
    --xla_tpu_overlap_compute_collective_tc=true
    --xla_enable_async_all_gather=true
    --xla_tpu_enable_data_parallel_all_reduce_opt=true
    --xla_tpu_data_parallel_opt_different_sized_ops=true
  )
  case $ACCELERATOR in
    v5p-*) flags+=(--xla_tpu_scoped_vmem_limit_kib=81920) ;;
    v5litepod-*|v5e-*|v6e-*) flags+=(--xla_tpu_scoped_vmem_limit_kib=98304) ;;
  esac
  echo "${flags[*]}"
}

run_llmlab() {
  local tpu_env=() libtpu_args=${LIBTPU_INIT_ARGS-$(default_libtpu_args)}
  [[ -z $libtpu_args ]] || tpu_env=("LIBTPU_INIT_ARGS=$libtpu_args")
  local command="cd ~ && env PYTHONUNBUFFERED=1 $(quoted "${tpu_env[@]}" "${ENVS[@]}")python3 -m llmlab $(quoted "${RUN_ARGS[@]}")"
  on_workers "${command% }"
}

main() {
  parse_args "$@"
  check_args
  setup
  prepare_package
  local retry=0 status
  while :; do
    ensure_ready
    status=0
    { install_on_workers && run_llmlab; } || status=$?
    if ((status == 0)); then
      log "llmlab finished on all workers of $NAME"
      ((!DELETE_AT_END)) || delete_slice
      return 0
    fi
    if ((status == EXIT_HANG)); then
      retry=$((retry + 1))
      ((retry <= RETRIES)) || fail "llmlab hung or lost its storage $retry times (status $EXIT_HANG); giving up (--retries=$RETRIES)"
      log "llmlab exited with status $EXIT_HANG (hung or storage stalled; stacks in WORKDIR/hang-*.txt);" \
          "restart $retry of $RETRIES resumes from the last checkpoint"
      sleep "$POLL"
      continue
    fi
    sleep "$POLL"  # a preempted node may still say READY for a moment
    read_state
    [[ $STATE != ready ]] || fail "llmlab failed (status $status) on a healthy slice $NAME; not retrying"
    retry=$((retry + 1))
    ((retry <= RETRIES)) || fail "slice $NAME lost $retry times (now ${RAW_STATE:-absent}); giving up (--retries=$RETRIES)"
    log "slice $NAME is ${RAW_STATE:-gone} (preempted?); retry $retry of $RETRIES resumes from the last checkpoint"
  done
}

main "$@"
