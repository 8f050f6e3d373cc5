#!/usr/bin/env bash
# Multi-node training with the `deepspeed` launcher over ssh (pdsh), started from one node.
#
# Usage: launchers/multinode.sh [options] [key=value overrides...]
#   -H, --hosts "h1,h2 h3"   hosts to train on (or HOSTS=...; separated by commas, spaces or newlines)
#   -f, --hostfile FILE      use this existing hostfile (`host slots=N` lines) instead of --hosts
#   -g, --gpus N             GPUs per node (GPUS_PER_NODE; default: `nvidia-smi -L | wc -l` here; not with --hostfile)
#   -a, --master-addr ADDR   address of the first node, reachable from all (MASTER_ADDR; default: first host)
#   -p, --master-port PORT   (MASTER_PORT; default 29500)
#   -c, --config FILE        run config (CONFIG; default configs/tiny.yaml)
#   -h, --help
# Environment: DRY_RUN=1 writes the files and prints the command instead of running it; DEEPSPEED (the launcher
# binary) and DEEPSPEED_ARGS (extra launcher flags, split like a shell would, quotes honoured, nothing expanded:
# e.g. "--launcher openmpi --launcher_args '-x FOO=1'").
#
# Writes ./hostfile (unless --hostfile) and ./.deepspeed_env (mode 600), which the launcher exports on every
# node: NCCL_*, AWS_*, WANDB_*, HPDM_*, TORCH_*, PYTHONPATH and CUDA_DEVICE_MAX_CONNECTIONS, where set. Values
# are never printed. Both files carry a marker line; a file of that name without it is never overwritten. With
# pdsh (the default launcher) the arguments are quoted for the remote shell, so they arrive unchanged. Every
# node must see this folder and the virtualenv at the same paths, and accept ssh from here without a password.
# Example:
#   HOSTS="gpu01 gpu02" launchers/multinode.sh -c configs/ucf101_hpdm_s.yaml train.run_dir=/shared/runs/s
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "multinode.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"; }

hosts=${HOSTS:-} hostfile="" gpus=${GPUS_PER_NODE:-} gpus_flag=0 addr=${MASTER_ADDR:-} port=${MASTER_PORT:-29500}
config=${CONFIG:-configs/tiny.yaml}
while [[ $# -gt 0 ]]; do
  case $1 in
    -H|--hosts) need_value "$@"; hosts=$2; shift 2 ;;
    -f|--hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
    -g|--gpus) need_value "$@"; gpus=$2 gpus_flag=1; shift 2 ;;
    -a|--master-addr) need_value "$@"; addr=$2; shift 2 ;;
    -p|--master-port) need_value "$@"; port=$2; shift 2 ;;
    -c|--config) need_value "$@"; config=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $port =~ ^[1-9][0-9]{0,4}$ && $port -le 65535 ]] || die "--master-port must be a port number (1-65535), got '$port'"
[[ -f $config ]] || die "config file $config not found (in $PWD)"
[[ -w . ]] || die "cannot write hostfile and .deepspeed_env in $PWD: start from a writable folder that every node sees"

# DEEPSPEED_ARGS, split like a shell would (quotes honoured) without running or expanding anything
xargs -r printf '%s\0' <<< "${DEEPSPEED_ARGS:-}" > /dev/null 2>&1 || die "cannot split DEEPSPEED_ARGS: unmatched quote?"
mapfile -d '' -t extra < <(xargs -r printf '%s\0' <<< "${DEEPSPEED_ARGS:-}")
launcher=pdsh
for i in "${!extra[@]}"; do
  case ${extra[i]} in
    --launcher) launcher=${extra[i + 1]:-} ;;
    --launcher=*) launcher=${extra[i]#--launcher=} ;;
  esac
done
launcher=${launcher,,}
# DeepSpeed's pdsh runner writes `cd FOLDER; PYTHON -u -m deepspeed.launcher.launch ...` for the remote shell with
# the folder unquoted (multinode_runner.py), and pdsh replaces %h %u %n %% in it
[[ $launcher != pdsh || $PWD =~ ^[A-Za-z0-9_@+=:,./~-]+$ ]] || die "DeepSpeed's pdsh launcher puts this folder" \
  "into the remote command without quotes, where its spaces or shell characters break it: start from a folder" \
  "whose path has none ('$PWD'), or with DEEPSPEED_ARGS=\"--launcher openmpi\""

# Marker lines: DeepSpeed skips '#' lines of a hostfile, and parses every .deepspeed_env line as KEY=VALUE (runner.py)
hostfile_marker="# written by launchers/multinode.sh (rewritten on every start)"
env_marker="HPDM_LAUNCHER=multinode.sh"
check_ours() {  # FILE MARKER HINT: refuse to overwrite a FILE that this script did not write
  [[ ! -e $1 ]] || grep -qxF -- "$2" "$1" 2>/dev/null || die "$PWD/$1 exists and was not written by this script: $3"
}
envfile=${DS_ENV_FILE:-.deepspeed_env}  # the name the launcher looks for in ~ and in this folder
check_ours "$envfile" "$env_marker" "move it away (DeepSpeed also reads ~/$envfile)"

if [[ -n $hostfile ]]; then
  [[ $gpus_flag == 0 ]] || die "--gpus does not go with --hostfile: the hostfile's slots=N give the GPUs of each node"
  [[ -f $hostfile ]] || die "hostfile $hostfile does not exist"
  # what DeepSpeed's hostfile parser (runner.py _parse_hostfile) would raise on, and slots=0, as one-line errors
  n=0 first="" seen=" "
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    [[ ! $line =~ ^[[:space:]]*(#|$) ]] || continue
    [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)([[:space:]]|$) ]] ||
      die "$hostfile line $n: expected 'HOST slots=N', got '$line'"
    host=${BASH_REMATCH[1]} slots=${BASH_REMATCH[2]}
    [[ $slots == *[1-9]* ]] || die "$hostfile line $n: $host has slots=0"
    [[ $seen != *" $host "* ]] || die "$hostfile line $n: $host is listed twice"
    seen+="$host " first=${first:-$host}
  done < "$hostfile"
  [[ -n $first ]] || die "hostfile $hostfile lists no host (only comments or blank lines)"
else
  read -r -d '' -a host_list <<< "${hosts//,/ }" || true  # -d '': newlines separate hosts too
  [[ ${#host_list[@]} -gt 0 ]] || die "no hosts: pass --hosts \"h1 h2\", set HOSTS, or pass --hostfile FILE"
  dups=$(printf '%s\n' "${host_list[@]}" | sort | uniq -d | tr '\n' ' ')
  [[ -z $dups ]] || die "hosts given more than once: $dups"
  if [[ -z $gpus ]]; then
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l) || gpus=0
    [[ $gpus -gt 0 ]] || die "cannot count GPUs with nvidia-smi here; pass --gpus N"
  fi
  [[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$gpus'"
  hostfile=hostfile
  check_ours "$hostfile" "$hostfile_marker" "move it away, or pass it with --hostfile $hostfile"
  { echo "$hostfile_marker"; printf '%s slots='"$gpus"'\n' "${host_list[@]}"; } > "$hostfile"
  first=${host_list[0]}
fi
addr=${addr:-$first}

# .deepspeed_env: one KEY=VALUE a line, no comments or blank lines (the launcher parses every line). DeepSpeed
# strips each value, wraps one with other characters than [A-Za-z0-9_@%+=:,./-] in double quotes and pdsh
# replaces %h %u %n %% (multinode_runner.py add_export; pdsh's pipecmd.c): a value holding $ ` " \ or those
# would be changed or run by the remote shell, so it is not forwarded (nor exported by DeepSpeed from here).
umask 077
tmp=$(mktemp "$envfile.XXXXXX")
echo "$env_marker" > "$tmp"
forwarded=()
while IFS= read -r name; do
  value=${!name}
  if [[ $value == *$'\n'* ]]; then
    echo "multinode.sh: not forwarding $name: its value spans several lines" >&2
    unset "$name"; continue
  fi
  if [[ $value == *[\$\`\"\\]* || $value =~ %[hun%] ]]; then
    echo "multinode.sh: not forwarding $name: the remote shell or pdsh would change its value" \
         "(it holds \$, \`, \", \\ or %h/%u/%n/%%)" >&2
    unset "$name"; continue
  fi
  [[ ! $value =~ ^[[:space:]]|[[:space:]]$ ]] ||
    echo "multinode.sh: warning: $name: DeepSpeed drops the leading and trailing spaces of its value" >&2
  printf '%s=%s\n' "$name" "$value" >> "$tmp"
  forwarded+=("$name")
done < <(compgen -e | grep -E '^(NCCL_|AWS_|WANDB_|HPDM_|TORCH_)|^(PYTHONPATH|CUDA_DEVICE_MAX_CONNECTIONS)$' |
         grep -vx "${env_marker%%=*}" | sort)
chmod 600 "$tmp"
mv -f "$tmp" "$envfile"

user_args=(train --config "$config" "$@")
# --log_level warning: the launcher would otherwise log its pdsh command, which carries the exported values
cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --master_addr "$addr" --master_port "$port" --log_level warning)
if [[ $launcher == pdsh ]]; then
  # DeepSpeed joins the arguments into one command line for the remote shell, wrapping one that holds a space in
  # double quotes (escaping " only) and leaving the others bare (multinode_runner.py, PDSHRunner.parse_user_args),
  # and pdsh replaces %h %u %n %% in it: quote each one so that the remote shell gives it back unchanged.
  # --force_multi: with one host DeepSpeed would start it here, without a shell, and get the quoted arguments.
  cmd+=(--force_multi)
  for i in "${!user_args[@]}"; do
    a=${user_args[i]//%/%%}
    if [[ $a == *" "* ]]; then
      a=${a//'\'/'\\'}
      a=${a//'$'/'\$'}
      a=${a//'`'/'\`'}
    elif [[ ! $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      a=\'${a//\'/\'\\\'\'}\'
    fi
    user_args[i]=$a
  done
fi
cmd+=("${extra[@]}" --module hpdm.cli "${user_args[@]}")

echo "hosts: $(awk 'NF && $1 !~ /^#/' "$hostfile" | tr '\n' ' ')(hostfile $hostfile)"
echo "forwarded to every node ($envfile): ${forwarded[*]:-none}"
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
if [[ $launcher == pdsh ]] && ! command -v pdsh >/dev/null; then
  die "the deepspeed launcher needs pdsh on this node (or set DEEPSPEED_ARGS=\"--launcher openmpi\")"
fi
exec "${cmd[@]}"
