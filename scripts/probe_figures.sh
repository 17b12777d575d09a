#!/usr/bin/env bash
# Regenerates the diagnostics pictures shown in the README from the demo's tiny checkpoints.
# Usage: scripts/probe_figures.sh [DEMO_DIR] [OUT_DIR]   (run `openvla-align demo` first)
set -euo pipefail
DEMO=${1:-openvla_align_demo}
OUT=${2:-docs/images}
WORK=$(mktemp -d)
mkdir -p "$OUT"
python - "$WORK/scenes" <<'PY'
# the demo's probe scenes as an ImageFolder, one class per shape
import sys
from pathlib import Path
from PIL import Image
from openvla_align.demo.scenes import make_split
for split, n, seed in (("train", 96, 0), ("val", 48, 1)):
    for i, scene in enumerate(make_split("probe", n, seed)):
        folder = Path(sys.argv[1]) / split / scene.target[1]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"{i:04d}.png")  # uint8 RGB
PY
IMG=$(ls "$WORK"/scenes/val/circle/*.png | head -n 1)
SFT="$DEMO/sft/seed0/adapter"
ALIGN="$DEMO/align/seed0/adapter"

openvla-align probe linear --data "$WORK/scenes" --model "$DEMO/base" --model "$DEMO/base::$SFT" \
  --model "$DEMO/base::$ALIGN" --layer 4 --batch-size 0 --epochs 300 --lr 0.05 \
  --out "$WORK/linear_probe.json" --plot "$OUT/linear_probe.png" | tee "$WORK/linear_probe.md"
openvla-align probe attention --model "$DEMO/base" --adapter "$ALIGN" --image "$IMG" \
  --prompt "What shape is the object?" --tokens shape --layers 1-8 --out "$OUT/attention_align.png"
openvla-align probe tsne --model "$DEMO/base" --adapter "$ALIGN" --data "$WORK/scenes/train" \
  --classes square,circle,triangle --layers 1,4,8 --feature visual-mean --out "$OUT/tsne_align.png"
openvla-align probe vlthink --make-synthetic "$WORK/vlthink" --model "$DEMO/base" \
  --model "$DEMO/base::$SFT" --model "$DEMO/base::$ALIGN" --out "$WORK/vlthink_out"
cat "$WORK/vlthink_out/vlthink.md"
rm -f "$OUT"/attention_align.json "$OUT"/tsne_align.json  # the pictures' data; the tables above are printed
cp "$(ls "$WORK"/vlthink/images/*.png | head -n 1)" "$OUT/vlthink_scene.png"
rm -rf "$WORK"
