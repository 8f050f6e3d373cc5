#!/usr/bin/env bash
# Training on one machine with the `deepspeed` launcher: one process per GPU.
#
# Usage: launchers/single_node.sh [options] [key=value overrides...]
#   -g, --gpus N             processes (NUM_GPUS; default: `nvidia-smi -L | wc -l`, or 2 CPU processes without a GPU)
#   -p, --master-port PORT   (MASTER_PORT; default 29500; pick another for a second job on the same machine)
#   -c, --config FILE        run config (CONFIG; default configs/tiny.yaml)
#   -h, --help
# Environment: DRY_RUN=1 prints the command instead of running it; DEEPSPEED (the launcher binary).
# The run resumes from train.run_dir's latest checkpoint when started again, with no flag. Example:
#   launchers/single_node.sh -c configs/ucf101_hpdm_s.yaml train.run_dir=runs/s
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "single_node.sh: $*" >&2; exit 2; }

gpus=${NUM_GPUS:-} port=${MASTER_PORT:-29500} config=${CONFIG:-configs/tiny.yaml}
while [[ $# -gt 0 ]]; do
  case $1 in
    -g|--gpus) gpus=$2; shift 2 ;;
    -p|--master-port) port=$2; shift 2 ;;
    -c|--config) config=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done

if [[ -z $gpus ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l) || gpus=0
  if [[ $gpus -eq 0 ]]; then
    gpus=2
    echo "note: no NVIDIA GPU found; running 2 CPU processes (gloo backend): a functional test, not real training" >&2
  fi
fi
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$gpus'"
[[ $port =~ ^[0-9]+$ ]] || die "--master-port must be a number, got '$port'"

cmd=("${DEEPSPEED:-deepspeed}" --num_gpus "$gpus" --master_port "$port" --module hpdm.cli train --config "$config" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
