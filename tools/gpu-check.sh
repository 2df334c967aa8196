#!/usr/bin/env bash
# The one command for a GPU machine: every check and measurement fastpt has, in stages, within a
# fixed time budget, packing what each stage produced into at most 8 files under $OUT as it goes.
#
# Build here (the GPU machines have no Rust toolchain), then run it through the device tool:
#
#   export FASTPT_COMMIT=$(git rev-parse --short=12 HEAD)   # the reports name the commit
#   cargo build --profile dist && cargo build --profile dist --example kernel_lab
#   run(command="bash tools/gpu-check.sh", carry=["target/dist/fastpt", "target/dist/examples/kernel_lab"], timeout_s=600)
#
# Stages, in order (each under its own `timeout`; a stage whose time would pass the global
# deadline gets what is left, or is skipped with a note when that is too little):
#   doctor      fastpt doctor --device cuda: where each kernel module came from, every kernel
#               (each attention kernel, FlashTc included, as ops), whole T5 and Llama steps
#               (flash attention; FlashTc on t5-tiny-d64 and llama-tiny-d64), in f32 and bf16.
#               A failure (or a timeout) stops the script.
#   flash-tc    FlashTc at real model sizes: a step with --attention flash-tc against flash
#               (t5-small, tinyllama-1.1b: heads of 64), loss and gradient norm.
#   kernel-lab  kernel_lab all --device cuda: every op's variants checked and timed.
#   claims      fastpt bench --claims: the papers' claims at their shapes (t5-base; t5-11b NF4).
#   baseline    fastpt bench --baseline: PyTorch + PEFT side by side on t5-base.
#   memory      fastpt bench: peak memory by shape (t5-small … t5-3b × pt, ept, lamp).
#   text-task   a short RTE run on the fixture T5 and its evaluation on the GPU.
#   ncu         one Nsight Compute report (--clock-control none --nvtx) of the flash-attention
#               forward, the fused embed + prompt kernel and NF4 dequantisation.
#
# $OUT (the device tool's; without it, target/gpu-check) gets, after every stage and each written
# to a temporary name and renamed: summary.md (a per-stage table: status, seconds, key lines),
# logs.tar.gz (every log and result folder), and kernels.ncu-rep + ncu-details.txt once ncu ran.
# Everything is also kept under bench/results/<date>-<gpu>/. Exits non-zero when doctor fails
# (its rc) or another stage fails or times out (the first such rc).
#
# Settings (environment):
#   FASTPT_BIN          the fastpt binary (default target/dist/fastpt, else target/release/fastpt)
#   KERNEL_LAB          the kernel lab (default target/dist/examples/kernel_lab, else
#                       target/release/examples/kernel_lab, else target/carry/kernel_lab)
#   GPU_CHECK_BUDGET    seconds for the whole script (default 540: the device tool stops a
#                       command at 600 s); each stage's timeout is a share of it (below)
#   GPU_CHECK_TIMEOUT_<STAGE>  a stage's own timeout in seconds, e.g. GPU_CHECK_TIMEOUT_KERNEL_LAB
#                       (0 skips the stage)
#   GPU_CHECK_RESULTS   the results folder (default bench/results/<date>-<gpu>)
#   DOCTOR_ARGS (default "--device cuda"), BENCH_ARGS (claims and baseline, default
#   "--rounds 10 --steps 2 --warmup 2"), MEMORY_ARGS (default "--rounds 1 --steps 1 --warmup 1"), NCU (the ncu binary;
#   default: on PATH, else /usr/local/cuda/bin/ncu), NCU_SET (default full), NCU_APP_ARGS (the
#   fastpt command line ncu profiles).
# nvidia-smi and ncu are looked up on PATH. The kernels are inside the binary (CUBIN for sm_90,
# build.rs): no NVRTC and no compile on the GPU machine; the doctor prints which image each
# module came from.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

now_ms() { date +%s%3N; }
START_MS=$(now_ms)

# ---- settings -----------------------------------------------------------------------------
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
BUDGET=${GPU_CHECK_BUDGET:-540}
is_uint "$BUDGET" || { echo "gpu-check: GPU_CHECK_BUDGET=$BUDGET is not a number of seconds" >&2; exit 2; }
DEADLINE_MS=$((START_MS + BUDGET * 1000))
max() { if (($1 > $2)); then echo "$1"; else echo "$2"; fi; }
# Kept back at the end for the last pack; a stage that overruns its timeout gets KILL_AFTER more
# seconds before SIGKILL; a stage is not started with less than MIN_STAGE seconds.
MARGIN=$(max 2 $((BUDGET / 50)))
KILL_AFTER=$(max 1 $((BUDGET / 100)))
MIN_STAGE=$(max 2 $((BUDGET * 3 / 100)))

STAGES=(doctor flash-tc kernel-lab claims baseline memory text-task ncu)
# Each stage's timeout, in percent of the budget (at 540 s: 135, 54, 81, 162, 81, 64, 54, 81).
# They add up to more than 100 %: most stages end well before their timeout, and the global
# deadline trims the later ones.
declare -A SHARE=([doctor]=25 [flash-tc]=10 [kernel-lab]=15 [claims]=30 [baseline]=15
  [memory]=12 [text-task]=10 [ncu]=15)
stage_cap() {
  local var="GPU_CHECK_TIMEOUT_${1//-/_}"
  var=${var^^}
  if [ -n "${!var:-}" ] && is_uint "${!var}"; then echo "${!var}"; else echo $((BUDGET * ${SHARE[$1]} / 100)); fi
}

pick_bin() { # the first executable of its arguments
  local f
  for f in "$@"; do [ -n "$f" ] && [ -x "$f" ] && { echo "$f"; return 0; }; done
  return 1
}
BIN=${FASTPT_BIN:-$(pick_bin target/dist/fastpt target/release/fastpt || echo target/dist/fastpt)}
LAB=${KERNEL_LAB:-$(pick_bin target/dist/examples/kernel_lab target/release/examples/kernel_lab target/carry/kernel_lab ||
  echo target/dist/examples/kernel_lab)}
if [ -z "${NCU+x}" ]; then
  NCU=$(command -v ncu || pick_bin /usr/local/cuda/bin/ncu || true)
fi
SMI=$(command -v nvidia-smi || true)
DOCTOR_ARGS=${DOCTOR_ARGS:---device cuda}
BENCH_ARGS=${BENCH_ARGS:---rounds 10 --steps 2 --warmup 2}
MEMORY_ARGS=${MEMORY_ARGS:---rounds 1 --steps 1 --warmup 1}
NCU_SET=${NCU_SET:-full}
# Batch 8 × 256 tokens + 100 prompt rows on t5-base: the attention of the papers' runs. Its first
# matching launches are the embed + prompt kernel, NF4 dequantisation of q, k, v and the first
# attention forward, so a launch count of 8 holds all three.
NCU_APP_ARGS=${NCU_APP_ARGS:-bench --device cuda --shape t5-base --setting pt --quant nf4 --batch 8 --input-len 256 --rounds 1 --steps 1 --warmup 0}

gpu_name=""
if [ -n "$SMI" ]; then
  gpu_name=$(timeout 20 "$SMI" --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
fi
slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
DIR=${GPU_CHECK_RESULTS:-bench/results/$(date +%F)-${slug:-no-gpu}}
OUT=${OUT:-target/gpu-check}
mkdir -p "$DIR" "$OUT" || exit 2
DIR=$(cd "$DIR" && pwd) && OUT=$(cd "$OUT" && pwd) || exit 2
echo "gpu-check: GPU '${gpu_name:-none found}', budget ${BUDGET} s, results in $DIR, packed into $OUT"

# ---- bookkeeping and packing --------------------------------------------------------------
declare -A STATUS SECS LIMIT NOTE
for s in "${STAGES[@]}"; do STATUS[$s]="not run"; done
EXIT=0
CURRENT=""
STAGE_PID=""

elapsed_s() { local d=$(($(now_ms) - START_MS)); echo "$((d / 1000)).$((d % 1000 / 100))"; }
left_ms() { echo $((DEADLINE_MS - $(now_ms))); }

# Key lines of a stage for the summary: its result tables and the lines that say pass or fail.
key_lines() {
  local s=$1 log="$DIR/$1.log"
  case $s in
    doctor)
      grep -E '^(device|           |checked|all [0-9]+ checks|no usable GPU|error:)' "$log" 2>/dev/null
      grep -F '| FAIL |' "$log" 2>/dev/null | head -n 60 ;;
    flash-tc) grep -E '^\||^error:|FAIL' "$log" 2>/dev/null ;;
    kernel-lab) grep -vE '^\s*$' "$log" 2>/dev/null | head -n 200 ;;
    claims) cat "$DIR/claims/claims.md" 2>/dev/null ;;
    baseline) cat "$DIR/baseline/table.md" "$DIR/baseline/baseline.md" 2>/dev/null ;;
    memory) cat "$DIR/memory/table.md" 2>/dev/null ;;
    text-task) grep -E '^(method|finished|interrupted|best dev|dev:|test:|error:)| on (dev|test) \(' "$log" 2>/dev/null ;;
    ncu)
      grep -hE '^  [A-Za-z_][A-Za-z0-9_]* \(|Duration|Throughput|Registers Per Thread|Achieved Occupancy|^==(ERROR|WARNING)==' \
        "$DIR/ncu/details.txt" "$log" 2>/dev/null | head -n 80 ;;
  esac
}

stage_table() {
  local s
  echo "| stage | status | seconds | timeout | note |"
  echo "|---|---|---:|---:|---|"
  for s in "${STAGES[@]}"; do
    echo "| $s | ${STATUS[$s]} | ${SECS[$s]:-} | ${LIMIT[$s]:-} | ${NOTE[$s]:-} |"
  done
}

write_summary() {
  local s
  echo "# gpu-check $(date -Is)"
  echo
  echo "- GPU: ${gpu_name:-none found}$(sed -n 's/^driver: */; driver /p' "$DIR/env.txt" 2>/dev/null | head -n1)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); binary: $BIN"
  echo "- budget ${BUDGET} s, elapsed $(elapsed_s) s, exit status so far $EXIT"
  echo "- results: $DIR (all of it in logs.tar.gz)"
  echo
  stage_table
  for s in "${STAGES[@]}"; do
    [ -f "$DIR/$s.log" ] || continue
    echo
    echo "## $s (${STATUS[$s]})"
    echo
    echo '```'
    key_lines "$s" | cut -c1-400
    if [ "${STATUS[$s]}" != ok ]; then
      echo "… last lines of $s.log:"
      tail -n 15 "$DIR/$s.log" | cut -c1-400
    fi
    echo '```'
  done
}

# Writes $2 to $OUT/$1 through a temporary name, so a kill never leaves a half-written file.
put() { cp -f "$2" "$OUT/$1.partial" && mv -f "$OUT/$1.partial" "$OUT/$1"; }

pack() {
  write_summary > "$DIR/summary.md" 2>/dev/null
  put summary.md "$DIR/summary.md"
  local parent base
  parent=$(dirname "$DIR") base=$(basename "$DIR")
  # The ncu report travels as its own file; safetensors (checkpoints) are not needed to read
  # the results and are the only large files.
  if tar -czf "$OUT/logs.tar.gz.partial" -C "$parent" --exclude='*.ncu-rep' --exclude='*.safetensors' \
    --exclude='*.partial' --exclude=logs.tar.gz "$base" 2>/dev/null; then
    # The device tool brings back files up to 16 MiB: past 15 MiB keep the text only.
    if [ "$(stat -c %s "$OUT/logs.tar.gz.partial")" -gt $((15 * 1024 * 1024)) ]; then
      (cd "$parent" && find "$base" -type f \( -name '*.log' -o -name '*.md' -o -name '*.txt' -o -name '*.json' \) -size -4M -print0 |
        tar -czf "$OUT/logs.tar.gz.partial" --null -T -)
    fi
    mv -f "$OUT/logs.tar.gz.partial" "$OUT/logs.tar.gz"
  fi
  if [ -s "$DIR/ncu/kernels.ncu-rep" ]; then
    if [ "$(stat -c %s "$DIR/ncu/kernels.ncu-rep")" -le $((16 * 1024 * 1024)) ]; then
      put kernels.ncu-rep "$DIR/ncu/kernels.ncu-rep"
    else
      NOTE[ncu]="kernels.ncu-rep is over 16 MiB: only ncu-details.txt comes back"
    fi
  fi
  [ -s "$DIR/ncu/details.txt" ] && put ncu-details.txt "$DIR/ncu/details.txt"
  return 0
}

# A signal (the device tool giving up, Ctrl-C): stop the running stage, pack, exit.
on_signal() {
  trap '' TERM INT HUP
  if [ -n "$STAGE_PID" ]; then
    # timeout(1) leads its own process group: the stage and everything it started.
    kill -TERM -- "-$STAGE_PID" 2>/dev/null || kill -TERM "$STAGE_PID" 2>/dev/null
    sleep 0.5
    kill -KILL -- "-$STAGE_PID" 2>/dev/null
    STATUS[$CURRENT]="interrupted (SIG$1)"
  fi
  echo "gpu-check: stopped by SIG$1 after $(elapsed_s) s" >&2
  ((EXIT != 0)) || EXIT=$((128 + $2))
  pack
  exit "$EXIT"
}
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
trap 'on_signal HUP 1' HUP

# ---- the stages (run in a child bash under timeout: exported with their settings) ----------
export BIN LAB DIR NCU NCU_SET NCU_APP_ARGS DOCTOR_ARGS BENCH_ARGS MEMORY_ARGS

stage_doctor() {
  # shellcheck disable=SC2086 # DOCTOR_ARGS is a list of words.
  "$BIN" doctor $DOCTOR_ARGS
}

stage_flash_tc() {
  # Loss and d inputs_embeds norm of one PT step, FlashTc against flash (same seed: same weights
  # and batch), within the doctor's bf16 step tolerances (loss 2e-2, gradient 1e-1).
  local shape att rc=0
  mkdir -p "$DIR/flash-tc"
  for shape in t5-small tinyllama-1.1b; do
    for att in flash flash-tc; do
      echo "== fastpt step --device cuda --attention $att --shape $shape --method pt"
      "$BIN" step --device cuda --dtype bf16 --attention "$att" --shape "$shape" --method pt \
        2>&1 | tee "$DIR/flash-tc/$shape-$att.txt" || rc=1
    done
  done
  echo
  echo "| shape | flash loss | flash-tc loss | rel diff | flash grad norm | flash-tc grad norm | rel diff | result |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|"
  for shape in t5-small tinyllama-1.1b; do
    awk -v shape="$shape" '
      { f = FILENAME == ARGV[1] ? 1 : 2 }
      /^loss / { loss[f] = $2 }
      /^grad norm / { grad[f] = $3 }
      function rel(a, b) { d = a - b; if (d < 0) d = -d; if (b < 0) b = -b; return b > 0 ? d / b : d }
      END {
        if (loss[1] == "" || loss[2] == "" || grad[1] == "" || grad[2] == "") {
          printf "| %s | %s | %s | | %s | %s | | FAIL (no result) |\n", shape, loss[1], loss[2], grad[1], grad[2]
          exit 1
        }
        rl = rel(loss[2], loss[1]); rg = rel(grad[2], grad[1])
        ok = (rl <= 2e-2 && rg <= 1e-1)
        printf "| %s | %s | %s | %.2e | %s | %s | %.2e | %s |\n", shape, loss[1], loss[2], rl, grad[1], grad[2], rg, ok ? "pass" : "FAIL"
        exit ok ? 0 : 1
      }' "$DIR/flash-tc/$shape-flash.txt" "$DIR/flash-tc/$shape-flash-tc.txt" || rc=1
  done
  return "$rc"
}

stage_kernel_lab() {
  "$LAB" all --device cuda
}

stage_claims() {
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of words.
  "$BIN" bench --claims --device cuda $BENCH_ARGS --out "$DIR/claims"
}

stage_baseline() {
  # shellcheck disable=SC2086
  "$BIN" bench --baseline --device cuda --shape t5-base --setting none --setting pt $BENCH_ARGS \
    --out "$DIR/baseline"
}

stage_memory() {
  # shellcheck disable=SC2086
  "$BIN" bench --device cuda --shape t5-small --shape t5-base --shape t5-large --shape t5-3b \
    --setting pt --setting ept --setting lamp $MEMORY_ARGS --out "$DIR/memory"
}

stage_text_task() {
  # The fixture T5 on the RTE fixture: training, rank and generation evaluation on the GPU.
  local rc
  "$BIN" run --device cuda --model tests/fixtures/t5-v1_0-tiny --task rte --data tests/fixtures/data/glue/rte \
    --set method=pt --set method.prompt_len=4 --set train.steps=20 --set train.batch_size=3 \
    --set train.warmup_steps=0 --set train.eval_every=10 --set train.max_len=40 --set train.max_target_len=4 \
    --set data.eval=rank --set out_dir="$DIR/run-rte"
  rc=$?
  ((rc == 0)) || return "$rc"
  "$BIN" eval "$DIR/run-rte" --split test --mode generate --device cuda
}

stage_ncu() {
  local rc
  mkdir -p "$DIR/ncu"
  # shellcheck disable=SC2086 # NCU_APP_ARGS is a list of words.
  "$NCU" --clock-control none --nvtx --set "$NCU_SET" \
    -k 'regex:^(attention_forward|embed_prompt_forward|nf4_dequantize)' -c 8 \
    --export "$DIR/ncu/kernels" --force-overwrite "$BIN" $NCU_APP_ARGS
  rc=$?
  [ -s "$DIR/ncu/kernels.ncu-rep" ] || { echo "gpu-check: ncu wrote no report"; return $((rc == 0 ? 1 : rc)); }
  "$NCU" --import "$DIR/ncu/kernels.ncu-rep" --page details > "$DIR/ncu/details.txt" 2>&1
  return "$rc"
}
export -f stage_doctor stage_flash_tc stage_kernel_lab stage_claims stage_baseline stage_memory \
  stage_text_task stage_ncu

# Runs stage $1 under timeout within the global deadline; $2, when given, is why it is skipped.
run_stage() {
  local s=$1 why=${2:-} cap t left start rc d
  if [ -n "$why" ]; then
    STATUS[$s]="skipped"
    NOTE[$s]=$why
    echo "== $s: skipped ($why)"
    return
  fi
  cap=$(stage_cap "$s")
  if ((cap == 0)); then # timeout(1) takes 0 as no limit: here it means "do not run"
    STATUS[$s]="skipped"
    NOTE[$s]="its timeout is 0"
    echo "== $s: skipped (timeout 0)"
    return
  fi
  left=$(($(left_ms) / 1000))
  t=$((left - MARGIN - KILL_AFTER))
  # Too little time: less than MIN_STAGE (or than the stage's own timeout, when that is less).
  if ((t < MIN_STAGE && t < cap)) || ((t < 1)); then
    STATUS[$s]="skipped"
    NOTE[$s]="too little time left (${left} s of ${BUDGET} s)"
    echo "== $s: skipped (${left} s left)"
    pack
    return
  fi
  ((t < cap)) || t=$cap
  LIMIT[$s]=$t
  STATUS[$s]="running"
  CURRENT=$s
  write_summary > "$OUT/summary.md.partial" 2>/dev/null && mv -f "$OUT/summary.md.partial" "$OUT/summary.md"
  echo "== $s (timeout ${t} s, $(elapsed_s) s elapsed)"
  start=$(now_ms)
  # In the background so that a signal reaches on_signal at once (wait returns; a foreground
  # child would delay the trap until it ends).
  timeout -k "$KILL_AFTER" "$t" bash -c 'set -o pipefail; "$0" 2>&1 | tee "$1"' \
    "stage_${s//-/_}" "$DIR/$s.log" < /dev/null &
  STAGE_PID=$!
  wait "$STAGE_PID"
  rc=$?
  STAGE_PID=""
  d=$(($(now_ms) - start))
  SECS[$s]="$((d / 1000)).$((d % 1000 / 100))"
  if ((rc == 0)); then
    STATUS[$s]="ok"
  elif { ((rc == 124)) || ((rc == 137)); } && ((d >= t * 1000)); then
    STATUS[$s]="timed out"
    NOTE[$s]="stopped after ${t} s"
    ((EXIT != 0)) || EXIT=124
  else
    STATUS[$s]="FAILED rc $rc"
    ((EXIT != 0)) || EXIT=$rc
  fi
  echo "== $s: ${STATUS[$s]} in ${SECS[$s]} s"
  pack
}

# ---- run ----------------------------------------------------------------------------------
{
  echo "date:    $(date -Is)"
  echo "host:    $(uname -a)"
  echo "commit:  $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "binary:  $BIN ($(stat -c '%s bytes, %y' "$BIN" 2>/dev/null || echo missing)) $(timeout 5 "$BIN" --version 2>/dev/null)"
  echo "lab:     $LAB ($(stat -c '%s bytes, %y' "$LAB" 2>/dev/null || echo missing))"
  echo "ncu:     ${NCU:-not found} $("${NCU:-false}" --version 2>/dev/null | tail -n1)"
  echo "nvcc:    $(nvcc --version 2>/dev/null | tail -n1)"
  [ -n "$SMI" ] && echo "driver:  $(timeout 20 "$SMI" --query-gpu=driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | head -n1)"
  echo "budget:  $BUDGET s (margin $MARGIN, kill after $KILL_AFTER, min stage $MIN_STAGE)"
  env | grep -E '^(FASTPT_|CUDA|GPU_CHECK_|DOCTOR_ARGS|BENCH_ARGS|MEMORY_ARGS|NCU)' | sort
} > "$DIR/env.txt" 2>&1
if [ -n "$SMI" ]; then
  timeout 20 "$SMI" > "$DIR/nvidia-smi.txt" 2>&1
fi

if [ ! -x "$BIN" ]; then
  echo "gpu-check: no fastpt binary at $BIN (build it here with 'cargo build --profile dist' and carry target/dist/fastpt)" |
    tee "$DIR/doctor.log" >&2
  STATUS[doctor]="FAILED"
  NOTE[doctor]="no binary at $BIN"
  for s in "${STAGES[@]:1}"; do run_stage "$s" "no fastpt binary"; done
  EXIT=2
  pack
  exit "$EXIT"
fi

run_stage doctor
if [ "${STATUS[doctor]}" != ok ]; then
  # Nothing after it means anything when the kernels are wrong (or hang).
  for s in "${STAGES[@]:1}"; do run_stage "$s" "doctor did not pass"; done
  pack
  echo
  stage_table
  echo "gpu-check: doctor did not pass (exit $EXIT); failing checks:"
  key_lines doctor | grep -E 'FAIL|error:|no usable'
  echo "gpu-check: summary in $OUT/summary.md, logs in $OUT/logs.tar.gz"
  exit "$EXIT"
fi
run_stage flash-tc
if [ -x "$LAB" ]; then run_stage kernel-lab; else run_stage kernel-lab "no kernel lab at $LAB"; fi
run_stage claims
run_stage baseline
run_stage memory
run_stage text-task
if [ -n "$NCU" ] && [ -x "$NCU" ]; then run_stage ncu; else run_stage ncu "ncu not found"; fi

pack
# The device tool shows the last 12,000 characters of the output: the table, not the whole summary.
echo
stage_table
echo "gpu-check: $(elapsed_s) s, results in $DIR, packed into $OUT (summary.md, logs.tar.gz) (exit $EXIT)"
exit "$EXIT"
