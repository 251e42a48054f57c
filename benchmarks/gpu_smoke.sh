#!/usr/bin/env bash
# GPU smoke test, in one command, of the paths a CPU machine does not take by default:
# 1. the 4-bit gradient check (benchmarks/backprop_check.py): adapter gradients before and after an
#    eval-mode forward, NF4 + bf16 on CUDA, for the tiny preset and a randomly initialised model
#    with Qwen2.5-0.5B's shapes;
# 2. a few NF4 + bf16 + gradient-checkpointing training steps on both, with held-out passes
#    (--eval-every) on the tiny one; checks the loss falls; prints step time, tokens/s and peak
#    GPU memory;
# 3. the bf16 adapter end to end: `eval --adapter` and `chat --adapter` after the run.
# Writes bench-out/gpu_smoke.json (and bench-out/gpu_smoke/backprop-*.json).
#
#   bash benchmarks/gpu_smoke.sh                  # needs an NVIDIA GPU; about 2-3 minutes
#   SMOKE_ALLOW_CPU=1 SMOKE_STEPS=4 bash benchmarks/gpu_smoke.sh   # dry run of the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
STEPS="${SMOKE_STEPS:-30}"
OUT="${SMOKE_OUT:-bench-out/gpu_smoke}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${SMOKE_ALLOW_CPU:-0}" != 1 ]; then
    echo "gpu_smoke: no CUDA device visible to torch; run this on a GPU machine" >&2
    exit 2
  fi
  echo "gpu_smoke: no CUDA device, running on the CPU (SMOKE_ALLOW_CPU=1)" >&2
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

rm -rf "$OUT"; mkdir -p "$OUT"
"$PY" benchmarks/make_random_model.py --shape qwen2.5-0.5b --out "$OUT/qwen-shape"
"$PY" benchmarks/backprop_check.py --model tiny --dtype bf16 --json "$OUT/backprop-tiny.json"
"$PY" benchmarks/backprop_check.py --model "$OUT/qwen-shape" --dtype bf16 --json "$OUT/backprop-qwen.json"

common=(--quant nf4 --mixed-precision bf16 --gradient-checkpointing --max-steps "$STEPS" --save-every 0
        --heads 4 --seq-len 128 --batch-size 8 --grad-accum 1 --warmup 2)
start=$(date +%s)
"$PY" -m hydra_edge finetune --model tiny "${common[@]}" --lr 3e-3 --out "$OUT/tiny" --eval-data hydra_edge/demo/eval.jsonl \
  --data hydra_edge/demo/train.jsonl --eval-every 10 --eval-em-rows 8
"$PY" -m hydra_edge finetune --model "$OUT/qwen-shape" "${common[@]}" --lr 1e-3 --out "$OUT/qwen" \
  --data hydra_edge/demo/train.jsonl
"$PY" -m hydra_edge eval --adapter "$OUT/tiny" --data hydra_edge/demo/eval.jsonl
"$PY" -m hydra_edge chat --adapter "$OUT/tiny" --prompt "Is this review positive? I loved every minute."
echo "---- summary ($(( $(date +%s) - start ))s of training runs) ----"
"$PY" benchmarks/run_summary.py "$OUT/tiny" --label "tiny preset" --require-falling-loss --json "$OUT/tiny.json"
"$PY" benchmarks/run_summary.py "$OUT/qwen" --label "Qwen2.5-0.5B shapes" --require-falling-loss --json "$OUT/qwen.json"
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads((out / n).read_text()) for n in ("tiny.json", "qwen.json")]
(out.parent / "gpu_smoke.json").write_text(json.dumps(rows, indent=2) + "\n")
PYEOF
rm -rf "$OUT/qwen-shape"
echo "gpu_smoke: ok"
