#!/usr/bin/env bash
# Everything issue 10 measures on the lent GPU machine, in one device call (device time is short: one call,
# not many). Here first, from the project root with .venv built:
#   bash ../shared/gpu/prepare-carry.sh .gpu
# then one `run` carrying .gpu, with a timeout that leaves time to rerun:
#   bash benchmarks/cuda/session.sh
# It installs the carried wheels into /tmp/site, then runs, each step on its own (a failing step does not stop
# the next), teeing every log into $OUT:
#   1. the GPU-only tests (pytest -m gpu tests/test_gpu.py),
#   2. python -m benchmarks.gpu on CUDA over NQ 150-440 (benchmarks/results/gpu.{json,md}, copied to $OUT),
#   3. python -m benchmarks.prewarm_throughput on CUDA ($OUT/scale_gpu_prewarm.json),
#   4. python -m benchmarks.processes on CUDA: 1, 4 and 16 worker processes sharing the GPU, one round
#      (benchmarks/results/processes_gpu.{json,md}, copied to $OUT).
# Environment: CARRY (default .gpu), OUT (default benchmarks/results/session), DEVICE (default cuda), N (questions
# for benchmarks.gpu, default all 291), PREWARM_N (passages for the pre-warm run, default all), WORKERS (worker
# process counts, default "1 4 16"). A dry run on a CPU machine: DEVICE=cpu N=3 PREWARM_N=200 WORKERS="1 2"
# CARRY=none bash benchmarks/cuda/session.sh (the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=${CARRY:-.gpu}
out=${OUT:-benchmarks/results/session}
device=${DEVICE:-cuda}
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && [ "$carry" = none ] && py=.venv/bin/python
if [ -d "$carry/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/whl/*.whl
  [ -d "$carry-faiss" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$carry"-faiss/*.whl
  export PYTHONPATH=/tmp/site:$PWD:$PWD/integrations
  encoder=$carry/model
  data=$carry/data
  export SEMTOKEN_GPU_ENCODER=$PWD/$encoder  # (the GPU tests' encoder)
else
  export PYTHONPATH=$PWD:$PWD/integrations
  encoder=all-MiniLM-L6-v2
  data=${DATA:-../shared/data}
fi
status=0
step() {  # name, command...: the command's output to $out/name.log; its status kept, the next step runs
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc in $((SECONDS - t0)) s; last lines:"
  tail -n 8 "$out/$name.log" | sed 's/^/   /'
  [ "$rc" -eq 0 ] || status=$rc
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
step gpu_tests "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
name=gpu
[ "$device" = cuda ] || name=session_$device
step benchmark "$py" -m benchmarks.gpu --device "$device" --encoder "$encoder" --data "$data" --name "$name" \
  ${N:+--n "$N"}
cp benchmarks/results/"$name".json benchmarks/results/"$name".md "$out"/ 2>/dev/null
step prewarm "$py" -m benchmarks.prewarm_throughput --device "$device" --encoder "$encoder" --data "$data" \
  --out "$out/scale_${device}_prewarm.json" ${PREWARM_N:+--n "$PREWARM_N"}
step processes "$py" -m benchmarks.processes --device "$device" --encoder "$encoder" --data "$data" \
  --workers ${WORKERS:-1 4 16} --rounds 1 --name "$name"
cp benchmarks/results/processes_"$name".json benchmarks/results/processes_"$name".md "$out"/ 2>/dev/null
echo "session status $status; files in $out:"
ls -l "$out"
exit "$status"
