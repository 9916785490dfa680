#!/usr/bin/env bash
# Issue 13's acceptance on the lent GPU machine, in one call: a LLaMA-2-70B-shaped random-weight Bundle
# compiled there through the CLI (profile, solve, export), then decoded by `hotcold run --json` and timed
# by `hotcold bench --bundle` (the same model object, the bench's timing loop), GPU bytes after load
# against the placement's account, and `run --gpu-budget` refusing a Bundle that does not fit.
#   SPEC=... BUDGET=8GB LAYERS=10 bash bench/device/one_runtime.sh      (writes under $OUT)
# On a CPU machine: SPEC=random:tiny:n_layers=4,workload=synthetic BUDGET=1MB DEV=cpu OUT=/tmp/o bash ...
set -u
OUT=${OUT:?set OUT}
DEV=${DEV:-cuda}
LAYERS=${LAYERS:-10}
SPEC=${SPEC:-random:llama2-70b:n_layers=$LAYERS,workload=synthetic,gen=auto}
BUDGET=${BUDGET:-8GB}
SMALL=${SMALL:-2GB}
DTYPE=${DTYPE:-fp16}
NEW=${NEW:-72}
WORK=${WORK:-/tmp/hc13}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log" >&2; }
hc() { python3 -m hotcold "$@"; }
mkdir -p "$OUT" "$WORK"
if [ -d .whl ] && ! python3 -c "import pulp, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; nproc; free -g | head -2;
  python3 -c "import torch, numba, triton; print(torch.__version__, numba.__version__, triton.__version__)"; } > "$OUT/machine.txt" 2>&1
B=$WORK/b
log "compile $SPEC budget $BUDGET"
t0=$(date +%s)
hc compile -m "$SPEC" --dataset embedded --device "$DEV" --dtype "$DTYPE" --rule gate --cpu-layout bundled \
  --policy fixed --preset h200 --ctx-len 512 --gpu-budget "$BUDGET" -o "$B" > "$OUT/compile.txt" 2>&1
echo "compile rc=$? seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/steps.log"
sync  # the Bundle written back to disk before anything is timed
du -sb "$B" >> "$OUT/steps.log"
# run and bench alternate (run, bench, run, bench) so a drift of the host's CPU rate hits both alike
for r in 1 2; do
  log "run round $r"
  hc run "$B" --token-ids 1,15,27,99 -n "$NEW" --ctx-len 512 --device "$DEV" --json > "$WORK/run$r.json" 2> "$WORK/run$r.err"
  echo "run$r rc=$?" | tee -a "$OUT/steps.log"
  [ "$r" -le "${BENCH_ROUNDS:-2}" ] || continue
  log "bench --bundle round $r"
  hc bench --bundle "$B" --cold-mode threshold --tokens 64 --warm 8 --ctx-len 512 --device "$DEV" --json \
    -o "$WORK/bench$r.json" > /dev/null 2> "$WORK/bench$r.err"
  echo "bench$r rc=$?" | tee -a "$OUT/steps.log"
done
log "run --gpu-budget $SMALL (must refuse)"
hc run "$B" --token-ids 1,15 -n 4 --ctx-len 512 --device "$DEV" --gpu-budget "$SMALL" > "$OUT/refuse.txt" 2>&1
echo "refuse rc=$?" | tee -a "$OUT/steps.log"

python3 - "$WORK" "$OUT" <<'PY'
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
res = {"kind": "one_runtime_device", "machine": open(os.path.join(out, "machine.txt")).read()}
for f in sorted(glob.glob(os.path.join(work, "*.json"))):
    d = json.load(open(f))
    d.pop("new_ids", None)
    res[os.path.basename(f)[:-5]] = d
for f in sorted(glob.glob(os.path.join(work, "*.err"))):
    res[os.path.basename(f)] = open(f).read()[-2000:]
json.dump(res, open(os.path.join(out, "one_runtime.json"), "w"), indent=1)
PY
if [ "$DEV" = cuda ] && [ "${TESTS:-1}" = 1 ]; then
  log "pytest (Triton ops on CUDA)"
  timeout ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_quant_triton.py > "$OUT/pytest_cuda.txt" 2>&1
  echo "pytest rc=$?" | tee -a "$OUT/steps.log"
fi
log "done"
