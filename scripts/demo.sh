#!/usr/bin/env bash
# The main job on the embedded default, in one command: invpt-deploy takes a small InvPT (tiny_pascal preset, random
# weights) from a checkpoint to verified FP32, FP16 and INT8 ONNX (checked with ONNX Runtime on CPU), to TensorRT
# engines built ahead of time with TensorRT for RTX (no GPU needed to build; each precision checked in the parsed
# network), then writes a parity report (PyTorch vs every artifact, per task, with visual diffs of the sample images)
# and a latency report, with one summary (summary.md, index.html). Installs what it needs into ./.venv first.
# Output: out/demo/ (a rerun reuses every verified artifact there). Also writes PyTorch predictions of the samples.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" calib,rtx
export PATH="$ROOT/.venv/bin:$PATH"
OUT="${1:-$ROOT/out/demo}"
mkdir -p "$OUT"
cd "$ROOT"
# INT8 calibration images: crops of the sample photos (smaller than the 128x128 model, as 'pad' preprocessing needs).
.venv/bin/python - "$OUT/calib" <<'PY'
import sys, pathlib, cv2, numpy as np
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for src in sorted(pathlib.Path("assets").glob("*.jpg")):
    img = cv2.imread(str(src))
    for i in range(6):
        y, x = rng.integers(0, img.shape[0] - 112), rng.integers(0, img.shape[1] - 112)
        p = out / f"{src.stem}_{i}.png"
        if not p.exists():  # a rerun keeps the calibration set, so the INT8 ONNX made from it is reused
            cv2.imwrite(str(p), img[y:y + 112, x:x + 112])
PY
# No --ckpt: the embedded default (out/demo/tiny_pascal.pth, written on the first run). With an official checkpoint:
#   invpt-deploy --ckpt InvPT_pascal_vitLp16.pth.tar --calib-data data/PASCALContext --data photos/ --out out/pascal
invpt-deploy --out "$OUT" --precision fp32,fp16,int8 --calib-data "$OUT/calib" --calib-samples 12 \
             --holdout-samples 4 --data assets --samples 3 --batch 1,2 --iters 20
invpt-infer --ckpt "$OUT/tiny_pascal.pth" assets/ --out "$OUT/predictions"
echo
echo "demo ok: $OUT"
ls -1 "$OUT"
echo "Summary: $OUT/summary.md and $OUT/index.html (tables, latency plot, per-task visual diffs)"
echo "Reports: $OUT/parity/parity.{json,md} and $OUT/bench/bench.{json,md,png}"
echo "Overview images: $OUT/predictions/*/overview.png (random weights: the maps are noise by design)"
echo "The .plan files are TensorRT-RTX engines for RTX GPUs (compute capability 8.0+); they were built and"
echo "precision-checked here, but their parity and latency need such a GPU (the reports say 'not run'). For Hopper"
echo "or Jetson, build with enterprise TensorRT on the target: invpt-trt-build --onnx tiny_pascal.onnx --fp16 --backend tensorrt"
