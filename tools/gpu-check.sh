#!/usr/bin/env bash
# The one command to run on a GPU machine, from the repository root, with a prebuilt
# target/release/fastpt (no Rust toolchain needed there):
#
#   bash tools/gpu-check.sh
#
# Writes bench/results/<date>-<gpu>/ with nvidia-smi.txt, doctor.log (`fastpt doctor --device
# cuda`: every kernel and step checked against the CPU reference on the GPU), kernel-lab.log
# (every op's variants checked and timed) and gpu-ops.log (criterion) when those binaries were
# carried to target/carry/ (see tools/README.md), bench-claims.log + claims/ (`fastpt bench
# --claims`) and bench-baseline.log + baseline/ (`fastpt bench --baseline`, needs torch and peft), run-rte.log + run-rte/ (a short text-task run and its evaluation on the GPU), bench-memory.log + memory/ (memory.svg: peak memory by shape). When $OUT is set (the device tool), the folder is also copied
# there. Exits non-zero when doctor (or bench) fails.
#
# Kernels are compiled by NVRTC at start-up (a CUDA toolkit, FASTPT_CUDA_HOME, or .venv-nvrtc from
# tools/nvrtc-venv.sh) or taken from the PTX cache ($FASTPT_PTX_CACHE, else ~/.cache/fastpt/ptx).
# Extra doctor arguments: DOCTOR_ARGS="--device cuda --seed 1" bash tools/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/fastpt
if [ ! -x "$BIN" ]; then
  echo "gpu-check: no $BIN (build it with 'cargo build --release' and copy it here)" >&2
  exit 2
fi

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
DIR="bench/results/$(date +%F)-${slug:-no-gpu}"
mkdir -p "$DIR"
echo "gpu-check: GPU '${gpu_name:-none found}', logs in $DIR"

{
  echo "date:    $(date -Is)"
  echo "host:    $(uname -a)"
  echo "commit:  $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "binary:  $BIN ($(stat -c '%y' "$BIN" 2>/dev/null))"
} > "$DIR/env.txt"
nvidia-smi > "$DIR/nvidia-smi.txt" 2>&1 || echo "gpu-check: nvidia-smi failed (see $DIR/nvidia-smi.txt)" >&2

status=0
echo "== fastpt doctor ${DOCTOR_ARGS:---device cuda}"
# shellcheck disable=SC2086 # DOCTOR_ARGS is a list of words.
"$BIN" doctor ${DOCTOR_ARGS:---device cuda} 2>&1 | tee "$DIR/doctor.log"
doctor_rc=${PIPESTATUS[0]}
[ "$doctor_rc" -eq 0 ] || { echo "gpu-check: doctor failed (exit $doctor_rc)" >&2; status=$doctor_rc; }

# The kernel lab and the criterion GPU benches, when carried (stripped) in target/carry/.
if [ -x target/carry/kernel_lab ]; then
  echo "== kernel lab (all ops, every variant)"
  target/carry/kernel_lab all --device cuda 2>&1 | tee "$DIR/kernel-lab.log"
  lab_rc=${PIPESTATUS[0]}
  [ "$lab_rc" -eq 0 ] || { echo "gpu-check: kernel lab failed (exit $lab_rc)" >&2; [ "$status" -ne 0 ] || status=$lab_rc; }
fi
if [ -x target/carry/gpu_ops ]; then
  echo "== criterion GPU benches"
  target/carry/gpu_ops --bench 2>&1 | tee "$DIR/gpu-ops.log"
fi

# The papers' claims at their shapes (t5-base; t5-11b with NF4), then fastpt vs PyTorch + PEFT
# on t5-base. BENCH_ARGS sets the step counts (few: device time is scarce).
BENCH_ARGS=${BENCH_ARGS:---steps 5 --warmup 2}
echo "== fastpt bench --claims"
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words.
"$BIN" bench --claims --device cuda $BENCH_ARGS --out "$DIR/claims" 2>&1 | tee "$DIR/bench-claims.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -eq 0 ] || { echo "gpu-check: bench --claims failed (exit $bench_rc)" >&2; [ "$status" -ne 0 ] || status=$bench_rc; }
echo "== fastpt bench --baseline (PyTorch + PEFT side by side)"
# shellcheck disable=SC2086
"$BIN" bench --baseline --device cuda --shape t5-base --setting none --setting pt $BENCH_ARGS --out "$DIR/baseline" 2>&1 | tee "$DIR/bench-baseline.log"
echo "== fastpt run on a text task (fixture T5, RTE fixture: training, rank and generation eval on the GPU)"
"$BIN" run --device cuda --model tests/fixtures/t5-v1_0-tiny --task rte --data tests/fixtures/data/glue/rte \
  --set method=pt --set method.prompt_len=4 --set train.steps=20 --set train.batch_size=3 \
  --set train.warmup_steps=0 --set train.eval_every=10 --set train.max_len=40 --set train.max_target_len=4 \
  --set data.eval=rank --set out_dir="$DIR/run-rte" 2>&1 | tee "$DIR/run-rte.log"
run_rc=${PIPESTATUS[0]}
[ "$run_rc" -eq 0 ] || { echo "gpu-check: fastpt run on rte failed (exit $run_rc)" >&2; [ "$status" -ne 0 ] || status=$run_rc; }
"$BIN" eval "$DIR/run-rte" --split test --mode generate --device cuda 2>&1 | tee -a "$DIR/run-rte.log"
echo "== fastpt bench: memory by shape"
# shellcheck disable=SC2086
"$BIN" bench --device cuda --shape t5-small --shape t5-base --shape t5-large --shape t5-3b \
  --setting pt --setting ept --setting lamp $BENCH_ARGS --out "$DIR/memory" 2>&1 | tee "$DIR/bench-memory.log"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/$(basename "$DIR")" && cp -r "$DIR"/. "$OUT/$(basename "$DIR")/"
  echo "gpu-check: copied to $OUT/$(basename "$DIR")"
fi
echo "gpu-check: logs in $DIR (exit $status)"
exit "$status"
