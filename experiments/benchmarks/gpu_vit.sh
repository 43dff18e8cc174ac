#!/usr/bin/env bash
# Issue 16's GPU run: ViT-B/16 and ViT-L/16 train steps (AdamW, bf16 compute, batch 256, 224 px) with attention
# `xla` and `cudnn` (jax.nn.dot_product_attention), images/s and MFU against vit_jax/benchmark.py's PEAK_TFLOPS
# (H100/H200 bf16 989 TFLOP/s dense), then a short profile (experiments/benchmarks/profile_cpu.py: per-op shares of
# a jax.profiler trace; it reads the GPU plane's "XLA Ops" line there).
#
# Paste into a device call from the repository root (about 6-8 minutes on an H200, compiles included):
#   bash experiments/benchmarks/gpu_vit.sh
# Outputs go to $OUT (the device call's folder) or /tmp/gpu_vit: one log per run, summary.jsonl (each run's JSON
# line), profile.txt, env.txt. Only jax, flax, optax, numpy and absl are needed: `vit_jax.benchmark` and the profiler
# import no TensorFlow, tfds, clu or ml_collections (tests/test_benchmark.py checks this with those blocked).
# Smaller runs for a smoke test on a CPU: MODELS=vit_pico BATCH=8 IMAGE=8 ATTNS=xla STEPS=2 PROFILE_MODEL=vit_pico.
set -uo pipefail
OUT_DIR=${OUT:-/tmp/gpu_vit}
MODELS=${MODELS:-vit_b16 vit_l16}
ATTNS=${ATTNS:-xla cudnn}
BATCH=${BATCH:-256}
IMAGE=${IMAGE:-224}
STEPS=${STEPS:-20}
PROFILE_MODEL=${PROFILE_MODEL:-vit_b16}
PROFILE_ATTN=${PROFILE_ATTN:-${ATTNS##* }}   # The last attention kernel listed (cudnn by default).
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/summary.jsonl"

{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, jax.devices())"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} 2>&1 | tee "$OUT_DIR/env.txt"

for model in $MODELS; do
  for attn in $ATTNS; do
    log="$OUT_DIR/${model}_${attn}.log"
    cmd=(python -m vit_jax.benchmark --model "$model" --mode train --dtype bfloat16 --batch_size "$BATCH"
         --image_size "$IMAGE" --attention_impl "$attn" --steps "$STEPS" --warmup 3)
    echo "\$ ${cmd[*]}" | tee "$log"
    if timeout "$RUN_TIMEOUT" "${cmd[@]}" >> "$log" 2>&1; then
      tail -n 2 "$log" | head -n 1
      tail -n 1 "$log" >> "$OUT_DIR/summary.jsonl"
    else
      echo "FAILED (exit $?): $model $attn; last lines of $log:"; tail -n 5 "$log"
    fi
  done
done

cmd=(python -m experiments.benchmarks.profile_cpu --model "$PROFILE_MODEL" --mode train --dtype bfloat16
     --batch_size "$BATCH" --image_size "$IMAGE" --attention_impl "$PROFILE_ATTN" --steps 3 --top 30
     --trace_dir /tmp/gpu_vit_trace)
echo "\$ ${cmd[*]}" | tee "$OUT_DIR/profile.txt"
timeout "$RUN_TIMEOUT" "${cmd[@]}" >> "$OUT_DIR/profile.txt" 2>&1 || echo "profile FAILED (exit $?)" \
  | tee -a "$OUT_DIR/profile.txt"
head -n 40 "$OUT_DIR/profile.txt"
echo "summary: $OUT_DIR/summary.jsonl"
python - "$OUT_DIR/summary.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  mfu = 'n/a' if r['mfu'] is None else '%.1f%%' % (100 * r['mfu'])
  print('%-8s %-6s img/s %9.1f  step %8.1f ms  MFU %s  peak %s TFLOP/s  %s' % (
      r['model'], r['attention_impl'], r['img_per_s'], r['step_ms_median'], mfu, r['peak_tflops'], r['device']))
PY
