#!/usr/bin/env bash
# Training on one machine with the `deepspeed` launcher: one process per GPU.
#
# Usage: launchers/single_node.sh [options] [key=value overrides...]
#   -g, --gpus N             processes (NUM_GPUS; default: `nvidia-smi -L | wc -l`, or 2 CPU processes without a GPU)
#   -p, --master-port PORT   (MASTER_PORT; default 29500; must be free here: pick another for a second job)
#   -c, --config FILE        run config (CONFIG; default configs/tiny.yaml)
#   -h, --help
# Environment: DRY_RUN=1 prints the command instead of running it; DEEPSPEED (the launcher binary).
# The launcher runs with --log_level warning: at info it logs the command line, overrides (and any secret
# in them) included. The run resumes from train.run_dir's latest checkpoint when started again, with no flag.
# Example:
#   launchers/single_node.sh -c configs/ucf101_hpdm_s.yaml train.run_dir=runs/s
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "single_node.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"; }

gpus=${NUM_GPUS:-} port=${MASTER_PORT:-29500} config=${CONFIG:-configs/tiny.yaml}
while [[ $# -gt 0 ]]; do
  case $1 in
    -g|--gpus) need_value "$@"; gpus=$2; shift 2 ;;
    -p|--master-port) need_value "$@"; port=$2; shift 2 ;;
    -c|--config) need_value "$@"; config=$2; shift 2 ;;
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
[[ $port =~ ^[1-9][0-9]{0,4}$ && $port -le 65535 ]] || die "--master-port must be a port number (1-65535), got '$port'"
[[ -f $config ]] || die "config file $config not found (in $PWD)"

cmd=("${DEEPSPEED:-deepspeed}" --num_gpus "$gpus" --master_port "$port" --log_level warning --module hpdm.cli train
     --config "$config" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# something already listening on the port (another job) would end in torch's EADDRINUSE traceback
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  die "port $port is in use on this machine (another job?): pick a free one with --master-port"
fi
exec "${cmd[@]}"
