#!/usr/bin/env bash
# The test suite in two fresh virtualenvs (both by default; name one to run only it: `bash scripts/test.sh current`):
#   openvla-pins  OpenVLA's pinned stack (transformers 4.40.1, tokenizers 0.19.1, timm 0.9.10, peft 0.11.1,
#                 draccus 0.8.0, tensorflow 2.15.0, tensorflow_datasets 4.9.3) plus the rest of what upstream's
#                 finetune.py imports, dlimp from ../shared/upstream (--no-deps) and OPENVLA_SRC set to a writable
#                 copy of ../shared/upstream/openvla: the real patched finetune.py, upstream's model class and RLDS
#                 pipeline run here. Without that folder (or with OPENVLA_UPSTREAM pointing elsewhere empty) the
#                 upstream tests skip and say why.
#   current       current releases of everything; the upstream tests skip (upstream pins transformers 4.40.1).
# Both use the CPU-runnable torch wheel of this machine kind (OpenVLA pins torch 2.2, which no CPU-only wheel here
# provides). That wheel is a CUDA build (~5.5 GB a venv; openvla-pins is ~7.7 GB with tensorflow), so each venv is
# removed once its tests ran and a green run keeps no pytest temp dirs (the upstream end-to-end test alone writes
# ~1 GB): peak disk is one venv, not two. KEEP_VENVS=1 keeps the venvs (e.g. to rerun one test file by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_pins=(torch==2.14.1 torchvision==0.29.1)
openvla_pins=(transformers==4.40.1 tokenizers==0.19.1 timm==0.9.10 peft==0.11.1 draccus==0.8.0)
# OpenVLA's data stack and the rest of upstream's import closure (pyproject.toml at c8f03f48)
openvla_stack=(tensorflow==2.15.0 tensorflow_datasets==4.9.3 "protobuf<5" tensorflow-metadata==1.14.0
  tensorflow_graphics==2021.12.3 sentencepiece==0.1.99 accelerate einops wandb json-numpy jsonlines rich)
upstream="${OPENVLA_UPSTREAM:-../shared/upstream}"
envs=("$@")
[ ${#envs[@]} -eq 0 ] && envs=(openvla-pins current)
status=0
for env in "${envs[@]}"; do
  venv=".venv-$env"
  rm -rf "$venv"
  echo "== $env: $(df -Ph . | awk 'NR==2 {print $4}') free on disk before the install"
  python3 -m venv "$venv"
  extra=()
  [ "$env" = openvla-pins ] && extra=("${openvla_pins[@]}" "${openvla_stack[@]}")
  "$venv/bin/pip" install -q "${torch_pins[@]}" -e '.[test]' "${extra[@]}"
  run_env=(env -u OPENVLA_SRC)
  if [ "$env" = openvla-pins ]; then
    if [ -d "$upstream/openvla/vla-scripts" ] && [ -d "$upstream/dlimp_openvla/dlimp" ]; then
      # shared/ is read-only in CI: build and patch writable copies inside the venv (removed with it)
      cp -r "$upstream/openvla" "$upstream/dlimp_openvla" "$venv/"
      chmod -R u+w "$venv/openvla" "$venv/dlimp_openvla"
      "$venv/bin/pip" install -q --no-deps "./$venv/dlimp_openvla"
      run_env=(env "OPENVLA_SRC=$PWD/$venv/openvla")
      echo "== $env: upstream tests on (OPENVLA_SRC=$venv/openvla, a copy of $upstream/openvla)"
    else
      echo "== $env: upstream tests skipped: no OpenVLA snapshot at $upstream (set OPENVLA_UPSTREAM to a folder" \
        "holding openvla/ and dlimp_openvla/)"
    fi
  fi
  echo "== $env: $("$venv/bin/python" -c 'import torch, transformers, timm, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, peft {peft.__version__}")')"
  start=$SECONDS
  "${run_env[@]}" "$venv/bin/python" -m pytest -q -rs -o tmp_path_retention_policy=failed tests || status=1
  echo "== $env: tests took $((SECONDS - start)) s"
  [ "${KEEP_VENVS:-0}" = 1 ] || rm -rf "$venv"
done
exit $status
