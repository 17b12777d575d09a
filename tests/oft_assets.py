"""Tiny assets for tests against a real OpenVLA-OFT checkout (``OPENVLA_OFT_SRC``); test-only helpers.

* :func:`oft_src` puts the checkout on ``sys.path``. OpenVLA and OpenVLA-OFT both ship a top-level ``prismatic``
  package: one process imports one of them, never both.
* :func:`fork_attention_installed`: OFT trains with its transformers fork, ``transformers==4.40.1`` whose
  ``LlamaSdpaAttention`` is bidirectional (``transformers-openvla-oft.patch`` applied to ``modeling_llama.py``).
* :func:`build_tiny_oft_checkpoint` writes a random-weight OpenVLA built from OFT's own ``prismatic/extern/hf``
  classes (through :func:`openvla_align.tiny.openvla.build_tiny_openvla_checkpoint`), with statistics in OFT's
  format (7-d action, 8-d LIBERO proprio).
* :func:`write_tiny_libero_rlds` writes a tfds RLDS build in the schema of OFT's LIBERO datasets.
* :func:`stock_finetune` runs OFT's ``vla-scripts/finetune.py`` on CPU under ``tests/_cpu_shim.py``.

Nothing from OFT is vendored: its classes are imported at call time and its three hf files are copied next to the
weights at runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import _proc
import numpy as np
from _cpu_shim import import_tensorflow_graphics
from assets import _scene, build_rlds, step_flags

from openvla_align.tiny.openvla import (
    ACTION_DIM,
    PICO_VIT,
    _norm_stats,
    bounds_stats,
    build_tiny_openvla_checkpoint,
    write_pico_sitecustomize,
)
from openvla_align.vla.families.openvla_oft import OFT_FORK_LLAMA_SHA256, STOCK_LLAMA_SHA256
from openvla_align.vla.families.openvla_oft import llama_modeling_sha256 as modeling_llama_sha256

TESTS_DIR = Path(__file__).resolve().parent
# transformers 4.40.1's models/llama/modeling_llama.py, before and after transformers-openvla-oft.patch
STOCK_MODELING_LLAMA_SHA256, FORK_MODELING_LLAMA_SHA256 = STOCK_LLAMA_SHA256, OFT_FORK_LLAMA_SHA256
# The tiny checkpoints' towers: openvla_align.tiny.openvla.PICO_VIT (pico ViT/14, ~2 s a bf16 step instead of
# ~90 s with ViT-S/14), registered in the script's processes by the `sitecustomize` that `oft_env` puts on PYTHONPATH.
LIBERO_DATASET = "libero_spatial_no_noops"
LIBERO_PROPRIO_DIM = 8  # OFT's LIBERO_CONSTANTS: EEF pose (6) + gripper qpos (2)
LIBERO_ACTION_CHUNK = 8  # OFT's LIBERO_CONSTANTS["NUM_ACTIONS_CHUNK"]
LIBERO_INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
]


def oft_src(src: Optional[os.PathLike] = None) -> Path:
    """The OpenVLA-OFT checkout (argument, else ``$OPENVLA_OFT_SRC``), first on ``sys.path`` so ``prismatic`` (OFT's)
    and ``experiments.robot`` import. Refuses a process that already imported OpenVLA's ``prismatic`` (one imported
    from another OFT copy stays in use: submodules resolve through the imported package).
    Pre-imports ``tensorflow_graphics`` the fast way (see :func:`_cpu_shim.import_tensorflow_graphics`)."""
    src = src if src is not None else os.environ.get("OPENVLA_OFT_SRC")
    if not src:
        raise RuntimeError("Set OPENVLA_OFT_SRC to an OpenVLA-OFT checkout (the directory holding `prismatic/`).")
    path = Path(src).resolve()
    for part in ("prismatic/vla/constants.py", "prismatic/extern/hf/modeling_prismatic.py", "vla-scripts/finetune.py"):
        if not (path / part).is_file():
            raise FileNotFoundError(f"{path} is not an OpenVLA-OFT checkout: {part} is missing")
    loaded = sys.modules.get("prismatic")
    if loaded is not None:
        origin = Path(getattr(loaded, "__file__", None) or "?").resolve().parent
        if not (origin / "vla" / "constants.py").is_file():  # OFT's alone has it (another OFT copy is fine)
            raise RuntimeError(
                f"`prismatic` is already imported from {origin}, not from an OpenVLA-OFT checkout ({path}): OpenVLA "
                "and OpenVLA-OFT both ship a top-level `prismatic` package and one process can import only one of "
                "them. Run OFT's tests in their own interpreter, with OPENVLA_SRC unset."
            )
    if str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    if loaded is None:
        import_tensorflow_graphics()  # `prismatic` imports it (droid_utils): 40+ s the plain way in a test process
    return path


def oft_unavailable() -> Optional[str]:
    """Why the OFT tests cannot run in this process (None when they can): no ``OPENVLA_OFT_SRC``, or transformers is
    not OFT's fork."""
    if not os.environ.get("OPENVLA_OFT_SRC"):
        return "OPENVLA_OFT_SRC is unset (scripts/test.sh sets it in its OpenVLA-OFT phase)"
    if not fork_attention_installed():
        return "transformers is not OpenVLA-OFT's fork (4.40.1 + transformers-openvla-oft.patch)"
    return None


def fork_attention_installed() -> bool:
    """Is the installed transformers OFT's fork (4.40.1 + bidirectional ``LlamaSdpaAttention``), byte for byte?"""
    return modeling_llama_sha256() == FORK_MODELING_LLAMA_SHA256


def oft_norm_stats(dataset: str = LIBERO_DATASET, seed: int = 0, proprio_dim: int = LIBERO_PROPRIO_DIM) -> Dict:
    """Random statistics in the layout OFT's pipeline writes (``dataset_statistics.json`` / ``config.norm_stats``):
    7-d action stats with the gripper unnormalised (``mask``), ``proprio_dim``-d proprio stats, counts."""
    rng = np.random.default_rng(seed)
    stats = _norm_stats(dataset, rng)
    stats[dataset]["proprio"] = bounds_stats(rng, proprio_dim)
    return stats


def build_tiny_oft_checkpoint(
    out_dir: os.PathLike,
    seed: int = 0,
    *,
    src: Optional[os.PathLike] = None,
    dataset: str = LIBERO_DATASET,
    hidden_size: int = 64,
    num_layers: int = 18,
    vocab_size: int = 1024,
    proprio_dim: int = LIBERO_PROPRIO_DIM,
) -> Path:
    """Save a tiny random OpenVLA built from OFT's ``prismatic/extern/hf`` classes + processor; returns ``out_dir``.

    Two fused pico ViT/14 towers (``PICO_VIT``) at 224 px (256 patches per image; OFT's ``get_num_patches``), a
    ``num_layers``-layer Llama of width ``hidden_size``, a tokenizer laid out in Llama-2's 32000-id space (OFT
    hard-codes ``ACTION_TOKEN_BEGIN_IDX = 31743``: the 256 action tokens are ids 31744..31999), statistics for
    ``dataset`` in OFT's format (:func:`oft_norm_stats`) and OFT's three hf files beside the weights. Loads with
    ``AutoModelForVision2Seq`` / ``AutoProcessor`` and ``trust_remote_code=True`` -- in a process where OFT's
    ``prismatic`` imports (its modeling file imports ``prismatic.vla.constants``) -- with SDPA attention, the
    default of transformers 4.40.1 on torch >= 2.1.1 (the config stores no attention implementation); the fork's
    bidirectional attention lives in ``LlamaSdpaAttention``.
    """
    path = oft_src(src)
    return build_tiny_openvla_checkpoint(
        out_dir,
        seed,
        src=path,
        dataset=dataset,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        norm_stats=oft_norm_stats(dataset, seed, proprio_dim),
        timm_model_ids=(PICO_VIT,) * 2,
    )


def write_tiny_libero_rlds(
    root: os.PathLike,
    name: str = LIBERO_DATASET,
    episodes: int = 6,
    steps: int = 10,
    seed: int = 0,
    image_size: int = 64,
) -> Path:
    """Build ``root/name/1.0.0/`` in the schema of OFT's LIBERO RLDS datasets; returns that directory.

    Per step: ``observation/image`` (third-person) and ``observation/wrist_image`` (JPEG), ``observation/state``
    (8: EEF position 3 + axis-angle 3 + gripper qpos 2; OFT's ``libero_dataset_transform`` splits it into
    ``EEF_state`` = state[:6] and ``gripper_state`` = state[-2:], the 8-d proprio) and ``observation/joint_state``
    (7), a 7-d action whose gripper is -1 (open) / +1 (close) as LIBERO's, and the language instruction.
    ``steps`` must cover OFT's LIBERO action chunk (8).
    """
    import tensorflow_datasets as tfds

    if steps < LIBERO_ACTION_CHUNK:
        raise ValueError(f"steps={steps}: OFT's LIBERO action chunk needs at least {LIBERO_ACTION_CHUNK} per episode")

    def make_episodes():
        rng = np.random.default_rng(seed)
        for ep in range(episodes):
            text = LIBERO_INSTRUCTIONS[ep % len(LIBERO_INSTRUCTIONS)]
            eef = rng.uniform(-0.3, 0.3, 6).astype(np.float32)
            traj = []
            for t in range(steps):
                action = rng.uniform(-0.9, 0.9, ACTION_DIM).astype(np.float32)
                action[-1] = 1.0 if rng.random() < 0.5 else -1.0
                eef = (eef + 0.05 * action[:6]).astype(np.float32)
                opening = np.float32(0.04 if action[-1] < 0 else 0.01)
                observation = {
                    "image": _scene(rng, image_size),
                    "wrist_image": _scene(rng, image_size),
                    "state": np.concatenate([eef, [opening, -opening]]).astype(np.float32),
                    "joint_state": rng.uniform(-1.5, 1.5, 7).astype(np.float32),
                }
                traj.append(
                    {"observation": observation, "language_instruction": text, "action": action, **step_flags(t, steps)}
                )
            yield traj

    image = tfds.features.Image(shape=(image_size, image_size, 3), dtype=np.uint8, encoding_format="jpeg")
    observation = {
        "image": image,
        "wrist_image": image,
        "state": tfds.features.Tensor(shape=(8,), dtype=np.float32),
        "joint_state": tfds.features.Tensor(shape=(7,), dtype=np.float32),
    }
    return build_rlds(root, name, observation, make_episodes, seed=seed)


# --------------------------------------------------------------------------------------------------- the stock script
def oft_env(home: os.PathLike, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a run of OFT's script: offline HF (remote-code cache in ``home``), wandb disabled, no GPU."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    home = Path(home)
    env.update(
        HF_HOME=str(home / "hf"),  # remote-code module cache and an empty hub cache
        TORCH_HOME=str(home / "torch"),
        HF_HUB_OFFLINE="1",  # `model_is_on_hf_hub` asks the Hub: offline, it answers False at once
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        PYTHONHASHSEED="0",
    )
    env.pop("OPENVLA_SRC", None)
    site = write_pico_sitecustomize(home / "sitecustomize")  # registers the pico towers at interpreter start
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def stock_finetune(
    checkout: os.PathLike,
    workdir: os.PathLike,
    argv: Sequence[str],
    *,
    env: Dict[str, str],
    nproc: int = 1,
    timeout: float = 900,
    check: bool = True,
    kill_at: Optional[Tuple[str, int]] = None,
) -> Tuple[subprocess.CompletedProcess, List[Dict]]:
    """Run ``checkout/vla-scripts/finetune.py argv`` on CPU under ``tests/_cpu_shim.py`` (torchrun when ``nproc`` > 1).

    The process runs in ``checkout``, as OFT's README has it: the script syncs ``modeling_prismatic.py`` and
    ``configuration_prismatic.py`` found under ``./prismatic/`` into ``--vla_path``. ``workdir`` receives the run
    spec, the shim's rendezvous file and ``metrics.json`` (every ``wandb.log`` of rank 0); give the script absolute
    ``--run_root_dir`` / ``--data_root_dir``. ``kill_at`` (point, occurrence): the shim kills the process there
    (``_cpu_shim.kill_at``). Returns (process, logged metrics).
    """
    checkout, workdir = Path(checkout).resolve(), Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, metrics = workdir / "spec.json", workdir / "metrics.json"
    spec = {"script": str(checkout / "vla-scripts" / "finetune.py"), "argv": [str(a) for a in argv]}
    spec.update(metrics=str(metrics), pythonpath=[str(checkout)])
    if kill_at:
        spec["kill_at"] = list(kill_at)
    spec_path.write_text(json.dumps(spec))
    shim = str(TESTS_DIR / "_cpu_shim.py")
    cmd = [sys.executable, "-W", "ignore", shim, str(spec_path)]
    if nproc > 1:
        launcher = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, "--nnodes", "1", "--nproc-per-node", str(nproc), shim, str(spec_path)]
    proc = _proc.run(cmd, cwd=checkout, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc, json.loads(metrics.read_text()) if metrics.exists() else []
