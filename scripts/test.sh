#!/usr/bin/env bash
# The test suite in two fresh virtualenvs: current releases, and OpenVLA's pinned stack (transformers 4.40.1,
# tokenizers 0.19.1, timm 0.9.10, peft 0.11.1, draccus 0.8.0, tensorflow 2.15.0, tensorflow_datasets 4.9.3).
# Both use the CPU-runnable torch wheel of this machine kind (OpenVLA pins torch 2.2, which no CPU-only wheel here
# provides).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_pins=(torch==2.14.1 torchvision==0.29.1)
openvla_pins=(transformers==4.40.1 tokenizers==0.19.1 timm==0.9.10 peft==0.11.1 draccus==0.8.0)
# OpenVLA's data stack, for the RLDS round trip of `openvla-align data build` (tests skip it where it is absent)
openvla_data=(tensorflow==2.15.0 tensorflow_datasets==4.9.3 "protobuf<5" tensorflow-metadata==1.14.0)
status=0
for env in openvla-pins current; do
  venv=".venv-$env"
  rm -rf "$venv"
  python3 -m venv "$venv"
  extra=()
  [ "$env" = openvla-pins ] && extra=("${openvla_pins[@]}" "${openvla_data[@]}")
  "$venv/bin/pip" install -q "${torch_pins[@]}" -e '.[test]' "${extra[@]}"
  echo "== $env: $("$venv/bin/python" -c 'import torch, transformers, timm, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, peft {peft.__version__}")')"
  "$venv/bin/python" -m pytest -q tests || status=1
done
exit $status
