#!/usr/bin/env bash
# The main job on the embedded default: a small InvPT (tiny_pascal preset, random weights) taken from a
# checkpoint to verified FP32, FP16 and INT8 ONNX (checked with ONNX Runtime on CPU), then to TensorRT engines
# built ahead of time with TensorRT for RTX (no GPU needed to build; each precision checked in the parsed network),
# plus PyTorch predictions on the sample images. Installs what it needs into ./.venv first. Output: out/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" calib,rtx
export PATH="$ROOT/.venv/bin:$PATH"
OUT="${1:-$ROOT/out/demo}"
mkdir -p "$OUT"
cd "$ROOT"
# Calibration images: crops of the sample photos (smaller than the 128x128 model, as 'pad' preprocessing needs).
.venv/bin/python - "$OUT/calib" <<'PY'
import sys, pathlib, cv2, numpy as np
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for src in sorted(pathlib.Path("assets").glob("*.jpg")):
    img = cv2.imread(str(src))
    for i in range(6):
        y, x = rng.integers(0, img.shape[0] - 112), rng.integers(0, img.shape[1] - 112)
        cv2.imwrite(str(out / f"{src.stem}_{i}.png"), img[y:y + 112, x:x + 112])
PY
invpt-init --config tiny_pascal --out "$OUT/tiny_pascal.pth" --official-format
invpt-export --ckpt "$OUT/tiny_pascal.pth" --out "$OUT/tiny_pascal.onnx" --dynamic-batch
invpt-quantize --onnx "$OUT/tiny_pascal.onnx" --precision fp16 --calib-data "$OUT/calib"
invpt-quantize --onnx "$OUT/tiny_pascal.onnx" --precision int8 --calib-data "$OUT/calib" --calib-samples 12 --holdout-samples 4
invpt-trt-build --onnx "$OUT/tiny_pascal.onnx" --fp32 --out "$OUT/tiny_pascal.plan"
invpt-trt-build --onnx "$OUT/tiny_pascal.onnx" --fp16          # reuses the verified tiny_pascal.fp16.onnx
invpt-trt-build --onnx "$OUT/tiny_pascal.onnx" --int8          # reuses the verified tiny_pascal.int8.onnx
invpt-infer --ckpt "$OUT/tiny_pascal.pth" assets/ --out "$OUT/predictions"
echo
echo "demo ok: $OUT"
ls -1 "$OUT"
echo "Manifests (see README): $OUT/tiny_pascal.json, .fp16.json, .int8.json; engines: tiny_pascal{,.fp16,.int8}.plan.json"
echo "Overview images: $OUT/predictions/*/overview.png (random weights: the maps are noise by design)"
echo "The .plan files are TensorRT-RTX engines for RTX GPUs (compute capability 8.0+); they were built and"
echo "precision-checked here, but loading and running them needs such a GPU. For Hopper or Jetson, build with"
echo "enterprise TensorRT on the target: invpt-trt-build --onnx tiny_pascal.onnx --fp16 --backend tensorrt"
