#!/usr/bin/env bash
# Issue 15 on the lent GPU machine: the 80-layer 4-bit LLaMA-2-70B-shaped runs of bench/bench_q70b.py
# (carry bench/.cache/q70b, made here by `python bench/bench_q70b.py --prepare bench/.cache/q70b`, and .whl).
#   DEADLINE=560 ARGS="--rounds 3" bash bench/device/q70b.sh          (writes under $OUT)
# With LCPP=DIR (the llama.cpp kit of ../shared/anchors/llamacpp, prepared into DIR) it runs llama.cpp
# instead: bash DIR/run.sh $DEADLINE 80 q4_0 $NGL.
set -u
OUT=${OUT:?set OUT}
DEADLINE=${DEADLINE:-560}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# one growing segment per stream instead of fixed-size blocks: what the process holds stays near what it allocated
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; nproc; free -g | head -2;
  lscpu | grep -E "Model name|Flags" | cut -c1-400;
  python3 -c "import torch, numba, triton; print(torch.__version__, numba.__version__, triton.__version__)"; } > "$OUT/machine.txt" 2>&1
if [ -n "${LCPP:-}" ]; then
  bash "$LCPP/run.sh" "$DEADLINE" "${LAYERS:-80}" q4_0 "${NGL:-50,52,81}"
  exit $?
fi
if [ -d .whl ] && ! python3 -c "import pulp, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=$PWD
timeout "$DEADLINE" python3 bench/bench_q70b.py --work bench/.cache/q70b --out "$OUT" ${ARGS:-} 2> "$OUT/q70b.log"
echo "rc=$?" >> "$OUT/q70b.log"
tail -40 "$OUT/q70b.log"
if [ -n "${TESTS:-}" ]; then
  timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider $TESTS > "$OUT/pytest_cuda.txt" 2>&1
  tail -3 "$OUT/pytest_cuda.txt"
fi
