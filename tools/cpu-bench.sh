#!/usr/bin/env bash
# The CPU counterpart of tools/gpu-check.sh: the claims table, the PyTorch + PEFT side by side and
# memory by shape, measured on this machine's CPU at shapes it can run in about an hour, from
# the repository root with a built target/release/fastpt:
#
#   bash tools/cpu-bench.sh
#
# Writes bench/results/<date>-cpu-<cores>core/ with env.txt (commit, CPU), bench-claims.log +
# claims/ (`fastpt bench --claims --shape t5-base`: every claim at t5-base, the LAMP group too,
# whose paper runs t5-11b), bench-baseline.log + baseline/ (fastpt vs PyTorch + PEFT on t5-base;
# $FASTPT_PYTHON names an interpreter with torch, transformers and peft) and bench-memory.log +
# memory/ (heap peak by shape, t5-small … t5-large, pt / ept / lamp). CPU figures are f32 on a few cores: they
# show the methods' relative costs, not what a GPU does.
# SHAPE (default t5-base) and BENCH_ARGS (default "--rounds 10 --steps 1 --warmup 1") change the
# settings.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/fastpt
if [ ! -x "$BIN" ]; then
  echo "cpu-bench: no $BIN (build it with 'cargo build --release')" >&2
  exit 2
fi
SHAPE=${SHAPE:-t5-base}
BENCH_ARGS=${BENCH_ARGS:---rounds 10 --steps 1 --warmup 1}
DIR="bench/results/$(date +%F)-cpu-$(nproc)core"
mkdir -p "$DIR"
echo "cpu-bench: logs in $DIR"
{
  echo "date:    $(date -Is)"
  echo "host:    $(uname -a)"
  echo "commit:  $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores)"
  echo "memory:  $(free -h | awk '/Mem:/ {print $2}')"
  echo "args:    SHAPE=$SHAPE BENCH_ARGS=$BENCH_ARGS"
} > "$DIR/env.txt"

status=0
echo "== fastpt bench --claims --shape $SHAPE"
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words.
"$BIN" bench --claims --device cpu --shape "$SHAPE" $BENCH_ARGS --out "$DIR/claims" 2>&1 | tee "$DIR/bench-claims.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "cpu-bench: bench --claims failed (exit $rc)" >&2; status=$rc; }
echo "== fastpt bench --baseline (PyTorch + PEFT side by side)"
# shellcheck disable=SC2086
"$BIN" bench --baseline --device cpu --shape "$SHAPE" --setting none --setting pt $BENCH_ARGS --out "$DIR/baseline" 2>&1 | tee "$DIR/bench-baseline.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "cpu-bench: bench --baseline failed (exit $rc)" >&2; [ "$status" -ne 0 ] || status=$rc; }
echo "== fastpt bench: memory by shape"
# The heap a LAMP cell leaves to later cells (faer's SVD workspace, a few MB) is noise at these
# shapes, so one run holds every setting and memory.svg shows them side by side.
"$BIN" bench --device cpu --shape t5-small --shape t5-base --shape t5-large --setting pt \
  --setting ept --setting lamp --rounds 1 --steps 1 --warmup 1 --out "$DIR/memory" 2>&1 | tee "$DIR/bench-memory.log"
echo "cpu-bench: logs in $DIR (exit $status)"
exit "$status"
