#!/usr/bin/env bash
# Regenerates the diagnostics pictures shown in the README from the demo's tiny checkpoints.
# Usage: scripts/probe_figures.sh [DEMO_DIR] [OUT_DIR]   (run `openvla-align demo` first)
set -euo pipefail
DEMO=${1:-openvla_align_demo}
OUT=${2:-docs/images}
WORK=$(mktemp -d)
mkdir -p "$OUT"
python - "$WORK" <<'PY'
import sys
from openvla_align.testing.data import write_image_folder
write_image_folder(sys.argv[1] + "/scenes", n_train=48, n_val=24, label="shape")
PY
IMG=$(ls "$WORK"/scenes/val/circle/*.png | head -n 1)

openvla-align probe linear --data "$WORK/scenes" --model "$DEMO/base" --model "$DEMO/base::$DEMO/sft/adapter" \
  --model "$DEMO/base::$DEMO/align/adapter" --layer 16 --batch-size 0 --epochs 300 --lr 0.05 \
  --out "$OUT/linear_probe.json" --plot "$OUT/linear_probe.png" | tee "$OUT/linear_probe.md"
openvla-align probe attention --model "$DEMO/base" --adapter "$DEMO/align/adapter" --image "$IMG" \
  --prompt "Do you see the circle?" --tokens circle --layers 10-18 --out "$OUT/attention_align.png"
openvla-align probe tsne --model "$DEMO/base" --adapter "$DEMO/align/adapter" --data "$WORK/scenes/train" \
  --classes square,circle,triangle --layers 1,9,18 --feature visual-mean --out "$OUT/tsne_align.png"
openvla-align probe vlthink --make-synthetic "$WORK/vlthink" --model "$DEMO/base" \
  --model "$DEMO/base::$DEMO/sft/adapter" --model "$DEMO/base::$DEMO/align/adapter" --out "$WORK/vlthink_out"
cp "$WORK/vlthink_out/vlthink.md" "$OUT/vlthink.md"
cp "$(ls "$WORK"/vlthink/images/*.png | head -n 1)" "$OUT/vlthink_scene.png"
rm -rf "$WORK"
