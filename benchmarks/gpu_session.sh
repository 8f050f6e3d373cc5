#!/usr/bin/env bash
# The GPU checks of one short device session, as one command. A lent GPU comes with about 15 minutes in all, its
# start included, and at most 10 minutes per command: each mode fits one command, and a session runs one mode.
#
#   make device-wheels                                 # on the workstation: .whl/ holds what the GPU machine lacks
#   bash benchmarks/gpu_session.sh recipe OUT [MIN]    # the token convolution's GPU tests, then
#                                                      # configs/synthetic_gpu.yaml for MIN minutes (default 6,
#                                                      # data generation included; level 0 alone for the first
#                                                      # half), each half stopped by SIGTERM (the trainer
#                                                      # checkpoints), then eval-synthetic with the config's
#                                                      # fine_start and from noise (MIN + about 3 minutes;
#                                                      # the second half shortened where needed so that the
#                                                      # evals end by 590 s);
#                                                      # also the top GPU operators of 3 joint steps
#   bash benchmarks/gpu_session.sh throughput OUT      # benchmarks/token_conv.py, GPU tests, hpdm bench-kernels,
#                                                      # train_throughput (~6 min), then compiled in the time left
#
# Every phase has its own time limit, so that one that hangs leaves the others their time; each writes its JSON
# (and the session's log) under OUT. Copy the tables into benchmarks/RESULTS.md with the date, device and commit.
set -uo pipefail
mode=${1:?usage: gpu_session.sh throughput|recipe OUT [MINUTES]}
out=${2:?usage: gpu_session.sh throughput|recipe OUT [MINUTES]}
mkdir -p "$out"
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/session.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=disabled PYTHONUNBUFFERED=1
work=${TMPDIR:-/tmp}/hpdm-gpu-session

phase() {  # phase NAME SECONDS COMMAND...: run it under a time limit, say how it ended and how long it took
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -s TERM -k 30 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}

within() {  # within SECONDS [RESERVE]: SECONDS, or less so that RESERVE more seconds end the session by 590 s
    local left=$((590 - ${2:-0} - SECONDS))
    echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, \
'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())" || exit 1
git rev-parse HEAD 2>/dev/null

case $mode in
throughput)
    # the token convolution by PyTorch and by the Triton kernels that model.kernels=auto takes on a GPU
    phase token-conv 120 python3 benchmarks/token_conv.py --out "$out/token_conv.json"
    phase gpu-tests 100 python3 -m pytest -q -m gpu tests/test_kernels_patch_gather.py \
        tests/test_kernels_context_fusion.py tests/test_attention.py tests/test_kernels_token_conv.py
    phase bench-kernels 130 python3 -m hpdm.cli bench-kernels --no-compile --out "$out/kernels.json"
    # bf16 at ZeRO-1: at ZeRO-0 DeepSpeed reads every gradient back to the host (RESULTS.md); ZeRO-0 once to compare
    phase throughput-bf16 230 python3 benchmarks/train_throughput.py train.zero_stage=1 --micro-batch 8 --warmup 5 \
        --steps 15 --cases bf16/adaptive bf16/non-adaptive --work "$work" --out "$out/train_throughput_bf16.json"
    phase throughput-bf16-zero0 120 python3 benchmarks/train_throughput.py --micro-batch 8 --warmup 5 --steps 15 \
        --cases bf16/adaptive --work "$work" --out "$out/train_throughput_bf16_zero0.json"
    phase throughput-fp32-lamb 140 python3 benchmarks/train_throughput.py --micro-batch 4 --warmup 5 --steps 15 \
        --cases fp32-lamb/adaptive --work "$work" --out "$out/train_throughput_fp32_lamb.json"
    # last, in the time left: torch.compile (inductor fuses the element-wise work around the matrix products, where
    # eager HPDM-S spends more host time launching kernels than the GPU spends running them)
    phase throughput-bf16-compile "$(within 240)" python3 benchmarks/train_throughput.py train.zero_stage=1 \
        train.compile=true --micro-batch 8 --warmup 10 --steps 15 --cases bf16/adaptive --work "$work" \
        --out "$out/train_throughput_bf16_compile.json"
    ;;
recipe)
    minutes=${3:-6}
    run=$work/synthetic_gpu
    rm -rf "$run"
    # the Triton token convolution has not trained on a GPU before: checked first, PyTorch's kernels if it fails
    kernels=auto
    phase token-conv-test 60 python3 -m pytest -q -m gpu tests/test_kernels_token_conv.py || kernels=reference
    train=(python3 -m hpdm.cli train --config configs/synthetic_gpu.yaml train.run_dir="$run" model.kernels=$kernels
           data.shards="$work/synthetic128" train.steps=1000000 train.sample_every=0 train.sample_at_end=false)
    # The config's level0_steps split at an unknown speed could leave no time for the finer levels: split the
    # time instead, level 0 alone for the first half, then a resume (which may change train.*) with every level.
    phase train-level0 "$((minutes * 30))" "${train[@]}" train.level0_steps=1000000
    # a profile of three joint steps soon after the resume: its table of top GPU operators comes back in OUT
    n=$(sed -n 's/^step_0*\([0-9][0-9]*\).*/\1/p' "$run/checkpoints/latest" 2>/dev/null)
    n=${n:-0}
    # shortened if the steps before ran long: a device call ends at 600 s, and the evals (<= 165 s) must follow
    phase train-all-levels "$(within $((minutes * 30)) 195)" "${train[@]}" train.level0_steps=0 \
        "train.profile_steps=[$((n + 20)),$((n + 23))]"
    cp "$run/metrics.jsonl" "$run"/profile/ops_*.txt "$out/" 2>/dev/null
    # 512 tiles per network call: the finest level has 343 tiles per video, and a call of this small model is
    # bound by its launches
    phase eval-synthetic "$(within 120)" python3 -m hpdm.cli eval-synthetic "$run" -n 64 --batch 32 --tile-batch 512 \
        --out "$out/eval_synthetic.json"
    # the first 16 of the same samples' level 0 with finer levels drawn from noise (the paper's sampler); last, and
    # small, so that the command stays within a device call's 10 minutes
    phase eval-synthetic-from-noise "$(within 45)" python3 -m hpdm.cli eval-synthetic "$run" -n 16 --batch 16 --tile-batch 512 \
        --fine-start 0 --out "$out/eval_synthetic_from_noise.json"
    ;;
*)
    echo "unknown mode $mode: throughput or recipe"
    exit 2
    ;;
esac
