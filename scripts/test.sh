#!/usr/bin/env bash
# The test suite in two fresh virtualenvs (both by default; name one to run only it: `bash scripts/test.sh current`):
#   openvla-pins  OpenVLA's pinned stack (transformers 4.40.1, tokenizers 0.19.1, timm 0.9.10, peft 0.11.1,
#                 draccus 0.8.0, tensorflow 2.15.0, tensorflow_datasets 4.9.3) plus the rest of what upstream's
#                 finetune.py imports, dlimp from ../shared/upstream (--no-deps) and OPENVLA_SRC set to a writable
#                 copy of ../shared/upstream/openvla: the real patched finetune.py, upstream's model class and RLDS
#                 pipeline run here. Without that folder (or with OPENVLA_UPSTREAM pointing elsewhere empty) the
#                 upstream tests skip and say why.
#                 Then, in the same venv before it is removed, a second pytest run on the OpenVLA-OFT tests only
#                 (tests/test_oft*.py): diffusers and imageio added, transformers 4.40.1's modeling_llama.py patched
#                 into OFT's fork (../shared/upstream/transformers-openvla-oft.patch, SHA-256 checked before and
#                 after: a mismatch fails the run), OPENVLA_OFT_SRC set to a writable copy of
#                 ../shared/upstream/openvla-oft and OPENVLA_SRC unset (OpenVLA and OFT both ship a top-level
#                 `prismatic`: one pytest process each). The first run leaves OPENVLA_OFT_SRC unset, so the OFT tests
#                 skip there. Without the OFT snapshot or the patch the second run is skipped and says why.
#   current       current releases of everything; the upstream and OFT tests skip (both pin transformers 4.40.1).
#                 Then, in the same venv, the README's first command's lock (constraints/demo.txt) is installed and
#                 tests/test_demo_lock.py runs again with DEMO_LOCK=1: the demo's quick setting prints the committed
#                 figures, also on an AVX2-only stand-in machine (they skip in the runs before, and say so).
# Both use the CPU-runnable torch wheel of this machine kind (OpenVLA pins torch 2.2, which no CPU-only wheel here
# provides). That wheel is a CUDA build (~5.5 GB a venv; openvla-pins is ~7.7 GB with tensorflow), so each venv is
# removed once its tests ran and a green run keeps no pytest temp dirs (the upstream end-to-end test alone writes
# ~1 GB): peak disk is one venv, not two. KEEP_VENVS=1 keeps the venvs (e.g. to rerun one test file by hand).
# Each pytest run uses both cores as two pytest-xdist workers, a test file per worker at a time (module fixtures, such
# as a tiny checkpoint or a script run several tests read, are built once), each worker and every process it starts
# on one thread: most of the time goes to starting the scripts' processes (single-threaded imports), which two
# workers overlap, and one BLAS thread per worker keeps the two from oversubscribing the cores (OpenMP threads
# spin-wait: two processes with two threads each ran some steps 30x slower). PYTEST_WORKERS=0 runs the tests in
# one process instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
pytest_args=(-q -rs -o tmp_path_retention_policy=failed -n "${PYTEST_WORKERS:-2}" --dist loadfile)
torch_pins=(torch==2.14.1 torchvision==0.29.1)
openvla_pins=(transformers==4.40.1 tokenizers==0.19.1 timm==0.9.10 peft==0.11.1 draccus==0.8.0)
# OpenVLA's data stack and the rest of upstream's import closure (pyproject.toml at c8f03f48)
openvla_stack=(tensorflow==2.15.0 tensorflow_datasets==4.9.3 "protobuf<5" tensorflow-metadata==1.14.0
  tensorflow_graphics==2021.12.3 sentencepiece==0.1.99 accelerate einops wandb json-numpy jsonlines rich)
# OpenVLA-OFT's additions to that stack (its pyproject leaves diffusers unpinned: 0.32.2, a release of OFT's time, early
# 2025, imports with transformers 4.40.1, numpy<2 and this torch) and its transformers fork, as SHA-256 of
# models/llama/modeling_llama.py before (stock 4.40.1) and after transformers-openvla-oft.patch (fork commit bc339d9a)
oft_stack=(diffusers==0.32.2 imageio)
stock_llama_sha=b5fb3c99e3e118d5ee6fd67874ad298fb83282ec0ca8e8c668c2cd63a0f5b609
fork_llama_sha=3aac24cec583a6ef5f60b6ec634a8bd3c8377784c5c63c8cc14cb6790554c52e
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
  run_env=(env -u OPENVLA_SRC -u OPENVLA_OFT_SRC)
  if [ "$env" = openvla-pins ]; then
    if [ -d "$upstream/openvla/vla-scripts" ] && [ -d "$upstream/dlimp_openvla/dlimp" ]; then
      # shared/ is read-only in CI: build and patch writable copies inside the venv (removed with it)
      cp -r "$upstream/openvla" "$upstream/dlimp_openvla" "$venv/"
      chmod -R u+w "$venv/openvla" "$venv/dlimp_openvla"
      "$venv/bin/pip" install -q --no-deps "./$venv/dlimp_openvla"
      run_env=(env -u OPENVLA_OFT_SRC "OPENVLA_SRC=$PWD/$venv/openvla")
      echo "== $env: upstream tests on (OPENVLA_SRC=$venv/openvla, a copy of $upstream/openvla)"
    else
      echo "== $env: upstream tests skipped: no OpenVLA snapshot at $upstream (set OPENVLA_UPSTREAM to a folder" \
        "holding openvla/ and dlimp_openvla/)"
    fi
  fi
  echo "== $env: $("$venv/bin/python" -c 'import torch, transformers, timm, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, peft {peft.__version__}")')"
  start=$SECONDS
  "${run_env[@]}" "$venv/bin/python" -m pytest "${pytest_args[@]}" tests || status=1
  echo "== $env: tests took $((SECONDS - start)) s"
  if [ "$env" = openvla-pins ]; then
    oft_tests=(tests/test_oft*.py)
    # tests elsewhere whose OFT case needs OPENVLA_OFT_SRC (they skip it in the OpenVLA run above)
    oft_cases=("tests/test_readme.py::test_first_screen_commands_run_on_a_copy_of_the_host[openvla-oft]"
      "tests/test_recipes.py::test_oft_field_list_is_ofts")
    if [ ! -d "$upstream/openvla-oft/vla-scripts" ] || [ ! -f "$upstream/transformers-openvla-oft.patch" ] ||
      [ ! -d "$venv/dlimp_openvla" ] || [ ! -e "${oft_tests[0]}" ]; then
      echo "== $env (OFT): OpenVLA-OFT tests skipped: needs $upstream/openvla-oft," \
        "$upstream/transformers-openvla-oft.patch, the OpenVLA snapshot above (dlimp) and tests/test_oft*.py"
    else
      start=$SECONDS
      cp -r "$upstream/openvla-oft" "$venv/"
      chmod -R u+w "$venv/openvla-oft"
      "$venv/bin/pip" install -q "${oft_stack[@]}"
      llama="$("$venv/bin/python" -c 'import pathlib, transformers; print(pathlib.Path(transformers.__file__).parent)')"
      llama="$llama/models/llama/modeling_llama.py"
      sha="$(sha256sum "$llama" | cut -d' ' -f1)"
      if [ "$sha" != "$stock_llama_sha" ]; then
        echo "== $env (OFT): FAILED: $llama is not transformers 4.40.1's (SHA-256 $sha, want $stock_llama_sha):" \
          "OFT's fork is that release plus transformers-openvla-oft.patch, never another one"
        status=1
      elif ! command -v patch >/dev/null; then
        echo "== $env (OFT): FAILED: the patch binary is missing (apt-get install patch); it applies OFT's fork"
        status=1
      else
        patch -s -p5 -d "$(dirname "$llama")" -i "$(realpath "$upstream/transformers-openvla-oft.patch")" || true
        sha="$(sha256sum "$llama" | cut -d' ' -f1)"
        if [ "$sha" != "$fork_llama_sha" ]; then
          echo "== $env (OFT): FAILED: patched modeling_llama.py has SHA-256 $sha, OFT's fork has $fork_llama_sha"
          status=1
        else
          echo "== $env (OFT): transformers-openvla-oft fork applied (modeling_llama.py SHA-256 ${sha:0:12}…)," \
            "$("$venv/bin/python" -c 'import diffusers; print("diffusers", diffusers.__version__)');" \
            "OPENVLA_OFT_SRC=$venv/openvla-oft (a copy of $upstream/openvla-oft), OPENVLA_SRC unset"
          env -u OPENVLA_SRC "OPENVLA_OFT_SRC=$PWD/$venv/openvla-oft" "$venv/bin/python" -m pytest \
            "${pytest_args[@]}" "${oft_tests[@]}" "${oft_cases[@]}" || status=1
        fi
      fi
      echo "== $env (OFT): fork install and tests took $((SECONDS - start)) s"
    fi
  fi
  if [ "$env" = current ]; then
    # The README's first command installs the demo's lock (constraints/demo.txt): put this venv on it, then run the
    # demo's quick setting, which must print the committed figures (tests/test_demo_lock.py, one process: each run
    # uses both cores)
    start=$SECONDS
    "$venv/bin/pip" install -q -c constraints/demo.txt -e '.[demo]'
    echo "== $env (demo lock): $("$venv/bin/python" -c 'import torch, transformers, peft, numpy; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, numpy {numpy.__version__}")')"
    DEMO_LOCK=1 "$venv/bin/python" -m pytest -q -rs -o tmp_path_retention_policy=failed -p no:xdist \
      tests/test_demo_lock.py || status=1
    echo "== $env (demo lock): install and tests took $((SECONDS - start)) s"
  fi
  [ "${KEEP_VENVS:-0}" = 1 ] || rm -rf "$venv"
done
exit $status
