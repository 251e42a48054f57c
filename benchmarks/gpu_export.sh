#!/usr/bin/env bash
# GPU export check: trains the tiny preset on CUDA, exports it for --device cuda in fp16 (adapters
# and dynamic) and int4, each validated on the GPU by the export itself, then scores each export on
# the demo's held-out split and measures decode speed against PyTorch. Writes bench-out/gpu_export/.
#
#   pip install 'hydra-edge[export-cuda]'    # onnxruntime-genai-cuda + onnxruntime-gpu, not [export]
#   bash benchmarks/gpu_export.sh            # needs an NVIDIA GPU; a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
OUT="${GPU_EXPORT_OUT:-bench-out/gpu_export}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" -c "import onnxruntime as o, sys; p = o.get_available_providers(); print('onnxruntime', o.__version__, p); \
sys.exit(0 if 'CUDAExecutionProvider' in p else 2)" || { echo "gpu_export: no CUDA onnxruntime; install hydra-edge[export-cuda] on a GPU machine" >&2; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"
"$PY" -m hydra_edge finetune --out "$OUT/run"
for spec in fp16:adapters fp16:dynamic int4:adapters; do
  precision=${spec%%:*}; mode=${spec##*:}
  "$PY" -m hydra_edge export --adapter "$OUT/run" --out "$OUT/$precision-$mode" --device cuda --precision "$precision" --mode "$mode"
  "$PY" -m hydra_edge eval --onnx "$OUT/$precision-$mode" --data hydra_edge/demo/eval.jsonl --json > "$OUT/$precision-$mode.eval.json"
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'exact-match', r['exact_match'], 'loss', round(r['loss'], 4))" \
    "$OUT/$precision-$mode.eval.json" "$precision-$mode"
done
"$PY" benchmarks/onnx_speed.py --adapter "$OUT/run" --export "$OUT/fp16-adapters" "$OUT/int4-adapters" --json "$OUT/speed.json"
echo "gpu_export: ok"
