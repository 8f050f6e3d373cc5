#!/usr/bin/env bash
# One node's part of a SLURM job: launchers/slurm.sbatch runs it as one srun task per node. It writes a hostfile
# from `scontrol show hostnames`, then runs the `deepspeed` launcher without ssh for this node only:
#   deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID --master_addr FIRST_HOST --master_port P \
#             --log_level warning --module hpdm.cli train --config CFG overrides...
# (--log_level warning: at info the launcher logs the command line, overrides and any secret in them included)
#
# Usage: srun --ntasks-per-node=1 launchers/slurm_node.sh [-c CONFIG] [key=value ...]   (inside an allocation)
# Environment: SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NODEID (set by SLURM); GPUS_PER_NODE (default:
# SLURM_GPUS_ON_NODE, else `nvidia-smi -L | wc -l`); MASTER_ADDR (default: the first host); MASTER_PORT
# (default: 20000 + job id % 20000); CONFIG; DEEPSPEED (the launcher binary); DRY_RUN=1 prints the command.
# The launcher and the trainers run in a process group of their own. SIGUSR1, SIGTERM or SIGINT reaching this
# script is passed on as SIGUSR1 to that group: the trainers checkpoint and exit, the launcher processes ignore
# SIGUSR1, so a signal sent to the whole step is safe too. This script exits only when every process of the
# group has exited, even when the launcher died first (SIGTERM to the whole step kills DeepSpeed's runner at
# once, while the trainers still save): SLURM would kill what is left of the step when it exits. After
# STOP_WAIT seconds (default 300) of waiting it kills them.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "slurm_node.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"; }

config=${CONFIG:-configs/tiny.yaml}
while [[ $# -gt 0 ]]; do
  case $1 in
    -c|--config) need_value "$@"; config=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
for v in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NODEID; do
  [[ -n ${!v:-} ]] || die "$v is not set: run this through launchers/slurm.sbatch (one srun task per node)"
done
[[ $SLURM_NODEID =~ ^(0|[1-9][0-9]*)$ ]] || die "SLURM_NODEID must be a number, got '$SLURM_NODEID'"
[[ -f $config ]] || die "config file $config not found (in $PWD)"

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#hosts[@]} -gt 0 ]] || die "scontrol show hostnames $SLURM_JOB_NODELIST returned no hosts"
[[ $SLURM_NODEID -lt ${#hosts[@]} ]] ||
  die "SLURM_NODEID=$SLURM_NODEID, but $SLURM_JOB_NODELIST has ${#hosts[@]} host(s): ids 0 to $((${#hosts[@]} - 1))"
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
gpus=${gpus##*:}  # "h100:8" -> 8
if [[ -z $gpus ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l) || gpus=0
fi
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "cannot tell the GPUs per node (got '$gpus'): set GPUS_PER_NODE"
addr=${MASTER_ADDR:-${hosts[0]}}
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
[[ $port =~ ^[1-9][0-9]{0,4}$ && $port -le 65535 ]] || die "MASTER_PORT must be a port number (1-65535), got '$port'"
stop_wait=${STOP_WAIT:-300}
[[ $stop_wait =~ ^[0-9]+$ ]] || die "STOP_WAIT must be a number of seconds, got '$stop_wait'"
hostfile=${TMPDIR:-/tmp}/hpdm-hostfile-$SLURM_JOB_ID-$SLURM_NODEID
printf '%s slots='"$gpus"'\n' "${hosts[@]}" > "$hostfile"

cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" --master_addr "$addr"
     --master_port "$port" --log_level warning --module hpdm.cli train --config "$config" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

# setsid: the launcher (runner -> deepspeed.launcher.launch -> one trainer per GPU) gets a process group of its
# own, $group, which keeps its trainers when the runner or launch dies. It inherits "ignore SIGUSR1"; the
# trainers install a handler.
( trap '' USR1; exec setsid "${cmd[@]}" ) &
group=$!
running() {  # the number of live (not zombie) processes of the group
  ps -e -o pgid=,stat= | awk -v g="$group" '$1 == g && $2 !~ /^Z/ {n++} END {print n + 0}'
}
forward() {
  echo "slurm_node.sh: node $SLURM_NODEID: $1: asking the trainers to checkpoint and stop" >&2
  kill -USR1 -- "-$group" 2>/dev/null || true
}
trap 'forward SIGUSR1' USR1
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
rc=0
wait "$group" || rc=$?
while kill -0 "$group" 2>/dev/null; do  # a trapped signal ended `wait` early: keep waiting
  rc=0
  wait "$group" || rc=$?
done
left=$(running) deadline=$((SECONDS + stop_wait))
if [[ $left -gt 0 ]]; then  # the launcher died first (SIGTERM to the whole step): the trainers may still be saving
  echo "slurm_node.sh: node $SLURM_NODEID: the launcher exited (status $rc); waiting up to $stop_wait s for" \
       "$left training process(es) to finish" >&2
  while [[ $left -gt 0 && $SECONDS -lt $deadline ]]; do
    sleep 1 || true  # a signal sent to the whole step ends sleep too
    left=$(running)
  done
  if [[ $left -gt 0 ]]; then
    echo "slurm_node.sh: node $SLURM_NODEID: $left training process(es) still running after $stop_wait s:" \
         "killing them" >&2
    kill -KILL -- "-$group" 2>/dev/null || true
    rc=1
  fi
fi
rm -f "$hostfile"
exit "$rc"
