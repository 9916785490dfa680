#!/usr/bin/env bash
# Issue 17 on the lent GPU machine: `hotcold study --scale llama2-70b` (every policy at equal GPU memory, all 80
# layers of random q4 weights, firing from Qwen2.5-Coder-1.5B's MBPP profiles). Carry bench/.cache/study70b/stats
# (made here by `hotcold study --scale llama2-70b --prepare bench/.cache/study70b/stats ...`, see docs/results.md)
# and .whl.
#   DEADLINE=540 ARGS="--scenarios swiglu --budgets 24GiB" bash bench/device/study70b.sh     (writes under $OUT)
set -u
OUT=${OUT:?set OUT}
DEADLINE=${DEADLINE:-540}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; nproc; free -g | head -2;
  python3 -c "import torch, numba, triton; print(torch.__version__, numba.__version__, triton.__version__)"; } > "$OUT/machine.txt" 2>&1
if [ -d .whl ] && ! python3 -c "import pulp, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=$PWD
timeout "$DEADLINE" python3 -m hotcold study --scale llama2-70b --stats bench/.cache/study70b/stats --device cuda \
  -o "$OUT/${NAME:-study}" ${ARGS:-} > "$OUT/${NAME:-study}.stdout" 2> "$OUT/${NAME:-study}.log"
echo "rc=$?" >> "$OUT/${NAME:-study}.log"
grep -v "━" "$OUT/${NAME:-study}.log" | tail -60
cat "$OUT/${NAME:-study}.stdout"
