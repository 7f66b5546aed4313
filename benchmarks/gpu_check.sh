#!/usr/bin/env bash
# Every GPU measurement of mrgr1 in one call, for a session that is lent a GPU (issue 18).
#
# Runs, each under its own time limit so the whole stays within 8 minutes (limits sized for one
# H200; the run time itself is not yet measured):
#   1. the CUDA-graph decode test (graph == static == eager tokens and samples)      tests/test_static_decode.py
#   2. parity of our Qwen2.5-VL with transformers' at the 7B shapes                  benchmarks/parity_real_size.py
#   3. rollout throughput at 16, 64, 128 rows, with the roofline per decode step     benchmarks/bench_generate.py
#   4. one GRPO step at the 7B shapes, time and peak memory per phase                 benchmarks/bench_grpo_step.py
# Each command's full output goes to $LOG_DIR/<name>.log (default $OUT/gpu_check, else
# /tmp/mrgr1_gpu_check: on the lent machine $OUT comes back to the session); this script prints one summary line per
# figure ("== name: ..."), and for a command that fails or runs out of time a FAILED line with its
# last output line, then goes on with the next.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu        # the same four steps at toy sizes on a CPU (checks the script)
#   bash benchmarks/gpu_check.sh --dry-run    # print the commands only
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
LOG_DIR=${LOG_DIR:-${OUT:-/tmp/mrgr1_gpu_check}/gpu_check}
mode=${1:-gpu}
[ "$mode" != "--dry-run" ] && mkdir -p "$LOG_DIR"

SLOW=1  # time limits are sized for the GPU run; the CPU check gets 5x (a shared CPU is slow)
if [ "$mode" = "--cpu" ]; then
    SLOW=5
    TEST=(python -m pytest -q tests/test_static_decode.py -k "cuda or static_samples")
    PARITY=(python benchmarks/parity_real_size.py --device cpu --preset tiny --image-size 112)
    GENERATE=(python benchmarks/bench_generate.py --device cpu --vocab 2048 --prompts 1 2 --image-size 112
              --new-tokens 8 --repeats 1 --threads 1 --bandwidth-tbs 0.01)
    GRPO=(python benchmarks/bench_grpo_step.py --preset tiny --device cpu --dtype float32 --max-new-tokens 16)
else
    TEST=(python -m pytest -q tests/test_static_decode.py -k cuda)
    PARITY=(python benchmarks/parity_real_size.py --device cuda --preset huatuogpt-vision-7b)
    GENERATE=(python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset huatuogpt-vision-7b
              --prompts 2 8 16 --image-size 448 --new-tokens 256 --repeats 1 --bandwidth-tbs measure)
    GRPO=(python benchmarks/bench_grpo_step.py --device cuda --dtype bfloat16)
fi

# step NAME SECONDS PATTERN COMMAND...: run COMMAND under a time limit, then print "== NAME: line"
# for every output line matching the extended regular expression PATTERN.
step() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    if [ "$mode" = "--dry-run" ]; then
        echo "timeout $limit $*"
        return
    fi
    local start=$SECONDS
    limit=$((limit * SLOW))
    timeout "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
    local rc=$?
    grep -E -- "$pattern" "$LOG_DIR/$name.log" | sed "s/^ */== $name: /"
    if [ "$rc" -ne 0 ]; then
        local why="exit $rc"
        [ "$rc" -eq 124 ] && why="time limit ${limit}s"
        echo "== $name: FAILED ($why): $(grep -v '^\s*$' "$LOG_DIR/$name.log" | tail -n 1)"
    fi
    echo "== $name: took $((SECONDS - start)) s (log $LOG_DIR/$name.log)"
}

[ "$mode" != "--dry-run" ] && python -c "import torch; print('== device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__)"
step graph_test 60 "passed|failed|skipped" "${TEST[@]}"
step parity 100 "^ *(float32|bfloat16)|top token|logits:" "${PARITY[@]}"
step generate 200 "rows:|tok/s|bandwidth" "${GENERATE[@]}"
step grpo_step 120 "^step:|checkpointing|generate |ref logps|update " "${GRPO[@]}"
