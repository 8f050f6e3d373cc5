#!/usr/bin/env bash
# One node's part of a SLURM job: launchers/slurm.sbatch runs it as one srun task per node. It writes a hostfile
# from `scontrol show hostnames`, then runs the `deepspeed` launcher without ssh for this node only:
#   deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID --master_addr FIRST_HOST --master_port P \
#             --module hpdm.cli train --config CFG overrides...
#
# Usage: srun --ntasks-per-node=1 launchers/slurm_node.sh [-c CONFIG] [key=value ...]   (inside an allocation)
# Environment: SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NODEID (set by SLURM); GPUS_PER_NODE (default:
# SLURM_GPUS_ON_NODE, else `nvidia-smi -L | wc -l`); MASTER_ADDR (default: the first host); MASTER_PORT
# (default: 20000 + job id % 20000); CONFIG; DEEPSPEED (the launcher binary); DRY_RUN=1 prints the command.
# SIGUSR1 or SIGTERM reaching this script is passed on as SIGUSR1 to the training processes only (they
# checkpoint and exit); the launcher processes ignore SIGUSR1, so a signal sent to the whole step is safe too.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "slurm_node.sh: $*" >&2; exit 2; }

config=${CONFIG:-configs/tiny.yaml}
while [[ $# -gt 0 ]]; do
  case $1 in
    -c|--config) config=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
for v in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NODEID; do
  [[ -n ${!v:-} ]] || die "$v is not set: run this through launchers/slurm.sbatch (one srun task per node)"
done

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#hosts[@]} -gt 0 ]] || die "scontrol show hostnames $SLURM_JOB_NODELIST returned no hosts"
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
gpus=${gpus##*:}  # "h100:8" -> 8
if [[ -z $gpus ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l) || gpus=0
fi
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "cannot tell the GPUs per node (got '$gpus'): set GPUS_PER_NODE"
hostfile=${TMPDIR:-/tmp}/hpdm-hostfile-$SLURM_JOB_ID-$SLURM_NODEID
printf '%s slots='"$gpus"'\n' "${hosts[@]}" > "$hostfile"
addr=${MASTER_ADDR:-${hosts[0]}}
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" --master_addr "$addr"
     --master_port "$port" --module hpdm.cli train --config "$config" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

# the launcher (runner -> deepspeed.launcher.launch) inherits "ignore SIGUSR1"; the trainers install a handler
( trap '' USR1; exec "${cmd[@]}" ) &
launcher=$!
forward() {  # the trainers are the launcher's grandchildren (runner -> launch -> one per GPU)
  local launch trainers=()
  for launch in $(ps -o pid= --ppid "$launcher" 2>/dev/null || true); do  # ps fails when none are left
    trainers+=($(ps -o pid= --ppid "$launch" 2>/dev/null || true))
  done
  echo "slurm_node.sh: node $SLURM_NODEID: $1: asking ${#trainers[@]} trainer(s) to checkpoint and stop" >&2
  [[ ${#trainers[@]} -eq 0 ]] || kill -USR1 "${trainers[@]}" 2>/dev/null || true
}
trap 'forward SIGUSR1' USR1
trap 'forward SIGTERM' TERM
rc=0
wait "$launcher" || rc=$?
while kill -0 "$launcher" 2>/dev/null; do  # a trapped signal ended `wait` early: keep waiting
  rc=0
  wait "$launcher" || rc=$?
done
rm -f "$hostfile"
exit "$rc"
