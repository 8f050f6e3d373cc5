#!/usr/bin/env bash
# Multi-node training with the `deepspeed` launcher over ssh (pdsh), started from one node.
#
# Usage: launchers/multinode.sh [options] [key=value overrides...]
#   -H, --hosts "h1,h2 h3"   hosts to train on (or HOSTS=...; commas or spaces)
#   -f, --hostfile FILE      use this existing hostfile (`host slots=N` lines) instead of --hosts
#   -g, --gpus N             GPUs per node (GPUS_PER_NODE; default: `nvidia-smi -L | wc -l` here)
#   -a, --master-addr ADDR   address of the first node, reachable from all (MASTER_ADDR; default: first host)
#   -p, --master-port PORT   (MASTER_PORT; default 29500)
#   -c, --config FILE        run config (CONFIG; default configs/tiny.yaml)
#   -h, --help
# Environment: DRY_RUN=1 writes the files and prints the command instead of running it; DEEPSPEED (the launcher
# binary) and DEEPSPEED_ARGS (extra launcher flags, e.g. "--launcher openmpi").
#
# Writes ./hostfile (unless --hostfile) and ./.deepspeed_env (mode 600), which the launcher exports on every
# node: NCCL_*, AWS_*, WANDB_*, HPDM_*, TORCH_*, PYTHONPATH and CUDA_DEVICE_MAX_CONNECTIONS, where set. Values
# are never printed. Every node must see this folder and the virtualenv at the same paths, and accept ssh from
# here without a password. Example:
#   HOSTS="gpu01 gpu02" launchers/multinode.sh -c configs/ucf101_hpdm_s.yaml train.run_dir=/shared/runs/s
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "multinode.sh: $*" >&2; exit 2; }

hosts=${HOSTS:-} hostfile="" gpus=${GPUS_PER_NODE:-} addr=${MASTER_ADDR:-} port=${MASTER_PORT:-29500}
config=${CONFIG:-configs/tiny.yaml}
while [[ $# -gt 0 ]]; do
  case $1 in
    -H|--hosts) hosts=$2; shift 2 ;;
    -f|--hostfile) hostfile=$2; shift 2 ;;
    -g|--gpus) gpus=$2; shift 2 ;;
    -a|--master-addr) addr=$2; shift 2 ;;
    -p|--master-port) port=$2; shift 2 ;;
    -c|--config) config=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done

if [[ -n $hostfile ]]; then
  [[ -s $hostfile ]] || die "hostfile $hostfile does not exist or is empty"
  first=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
else
  read -r -a host_list <<< "${hosts//,/ }"
  [[ ${#host_list[@]} -gt 0 ]] || die "no hosts: pass --hosts \"h1 h2\", set HOSTS, or pass --hostfile FILE"
  if [[ -z $gpus ]]; then
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l) || gpus=0
    [[ $gpus -gt 0 ]] || die "cannot count GPUs with nvidia-smi here; pass --gpus N"
  fi
  [[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$gpus'"
  hostfile=hostfile
  printf '%s slots='"$gpus"'\n' "${host_list[@]}" > "$hostfile"
  first=${host_list[0]}
fi
addr=${addr:-$first}
[[ $port =~ ^[0-9]+$ ]] || die "--master-port must be a number, got '$port'"

# .deepspeed_env: one KEY=VALUE a line, no comments or blank lines (the launcher parses every line)
envfile=${DS_ENV_FILE:-.deepspeed_env}  # the name the launcher looks for in ~ and in this folder
umask 077
tmp=$(mktemp "$envfile.XXXXXX")
forwarded=()
while IFS= read -r name; do
  value=${!name}
  if [[ $value == *$'\n'* ]]; then
    echo "multinode.sh: not forwarding $name: its value spans several lines" >&2
    continue
  fi
  printf '%s=%s\n' "$name" "$value" >> "$tmp"
  forwarded+=("$name")
done < <(compgen -e | grep -E '^(NCCL_|AWS_|WANDB_|HPDM_|TORCH_)|^(PYTHONPATH|CUDA_DEVICE_MAX_CONNECTIONS)$' | sort)
chmod 600 "$tmp"
mv -f "$tmp" "$envfile"

# --log_level warning: the launcher would otherwise log its pdsh command, which carries the exported values
cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --master_addr "$addr" --master_port "$port" --log_level warning)
read -r -a extra <<< "${DEEPSPEED_ARGS:-}"
cmd+=("${extra[@]}" --module hpdm.cli train --config "$config" "$@")

echo "hosts: $(awk 'NF && $1 !~ /^#/' "$hostfile" | tr '\n' ' ')(hostfile $hostfile)"
echo "forwarded to every node ($envfile): ${forwarded[*]:-none}"
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
if [[ " ${DEEPSPEED_ARGS:-} " != *" --launcher "* ]] && ! command -v pdsh >/dev/null; then
  die "the deepspeed launcher needs pdsh on this node (or set DEEPSPEED_ARGS=\"--launcher openmpi\")"
fi
exec "${cmd[@]}"
