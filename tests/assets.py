"""Test-only assets: generated scenes as an image folder, tiny RLDS builds in the paper's schema (tensorflow-datasets),
upstream's RLDS dataset over them, and a third-party teacher package installed for a finetune script's processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import numpy as np

from openvla_align.tiny.data import COLORS, SHAPES, generate_scenes
from openvla_align.tiny.openvla import ACTION_DIM


def write_image_folder(root, n_train: int = 24, n_val: int = 12, label: str = "shape", seed: int = 0, size: int = 224):
    """Generated scenes as an ImageFolder (``root/{train,val}/<class>/*.png``), classes = shapes or colours."""
    from PIL import Image

    names = SHAPES if label == "shape" else tuple(COLORS)
    root = Path(root)
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + 1)):
        scenes = generate_scenes(n, seed=split_seed, size=size)
        labels = getattr(scenes, f"{label}_label")
        for i in range(n):
            folder = root / split / names[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (scenes.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{split}_{i:04d}.png")
    return root


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, size - size // 4, 2)
        h, w = rng.integers(size // 8, size // 4, 2)
        img[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return img


def write_tiny_rlds(
    root: os.PathLike, name: str = "sft", episodes: int = 6, steps: int = 5, seed: int = 0, image_size: int = 64
) -> Path:
    """Build ``root/name/1.0.0/`` with tensorflow-datasets in the paper's RLDS schema; returns that directory."""
    import tensorflow_datasets as tfds

    instructions = ["pick up the red block", "put the cube in the bowl", "open the drawer", "push the blue cube left"]

    def make_episodes():
        rng = np.random.default_rng(seed)
        for ep in range(episodes):
            text = instructions[ep % len(instructions)]
            traj = []
            for t in range(steps):
                action = rng.uniform(-0.4, 0.4, ACTION_DIM).astype(np.float32)
                action[-1] = float(rng.random() < 0.5)
                observation = {"image": _scene(rng, image_size)}
                traj.append(
                    {"observation": observation, "language_instruction": text, "action": action, **step_flags(t, steps)}
                )
            yield traj

    image = tfds.features.Image(shape=(image_size, image_size, 3), dtype=np.uint8, encoding_format="jpeg")
    return build_rlds(root, name, {"image": image}, make_episodes, seed=seed)


def step_flags(t: int, steps: int) -> Dict:
    """The RLDS bookkeeping fields of step ``t`` of ``steps`` (reward 1 on the last step only)."""
    last = t == steps - 1
    return {
        "reward": np.float32(last),
        "discount": np.float32(1.0),
        "is_first": t == 0,
        "is_last": last,
        "is_terminal": last,
    }


def build_rlds(root: os.PathLike, name: str, observation: Dict, make_episodes, seed: int = 0) -> Path:
    """Write ``root/name/1.0.0/`` with tensorflow-datasets; returns that directory.

    ``observation`` maps observation keys to tfds features; ``make_episodes()`` yields episodes, each a list of steps
    (``observation``, ``language_instruction``, a 7-d float32 ``action`` and :func:`step_flags`).
    """
    import tensorflow_datasets as tfds

    root = Path(root)

    def examples():
        for ep, traj in enumerate(make_episodes()):
            path = f"/tiny/{name}/episode_{ep}.npy"
            yield path, {"steps": traj, "episode_metadata": {"file_path": path}}

    features = tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(observation),
                    "language_instruction": tfds.features.Text(),
                    "action": tfds.features.Tensor(shape=(ACTION_DIM,), dtype=np.float32),
                    "reward": tfds.features.Scalar(dtype=np.float32),
                    "discount": tfds.features.Scalar(dtype=np.float32),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                    "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
        }
    )

    with tfds.core.registered.skip_registration():
        builder_cls = type(
            f"TinyRlds_{name}_{seed}",
            (tfds.core.GeneratorBasedBuilder,),
            {
                "name": name,
                "VERSION": tfds.core.Version("1.0.0"),
                "RELEASE_NOTES": {"1.0.0": "tiny generated episodes"},
                "_info": lambda self: tfds.core.DatasetInfo(builder=self, features=features),
                "_split_generators": lambda self, dl_manager: {"train": examples()},
                "_generate_examples": lambda self: examples(),
            },
        )
    builder = builder_cls(data_dir=str(root))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return root / name / "1.0.0"


def tiny_rlds_dataset(root: os.PathLike, processor, name: str = "sft", shuffle_buffer_size: int = 100):
    """Upstream's ``RLDSDataset`` over :func:`write_tiny_rlds`'s build, with the batch transform finetune.py uses."""
    from prismatic.models.backbones.llm.prompting import PurePromptBuilder
    from prismatic.vla.action_tokenizer import ActionTokenizer
    from prismatic.vla.datasets import RLDSBatchTransform, RLDSDataset

    from openvla_align.openvla.datasets import register_paper_datasets

    register_paper_datasets()
    transform = RLDSBatchTransform(
        ActionTokenizer(processor.tokenizer),
        processor.tokenizer,
        image_transform=processor.image_processor.apply_transform,
        prompt_builder_fn=PurePromptBuilder,
    )
    return RLDSDataset(
        Path(root),
        name,
        transform,
        resize_resolution=(224, 224),
        shuffle_buffer_size=shuffle_buffer_size,
        image_aug=False,
    )


TEACHER_PLUGIN = '''
"""A third-party teacher: C-RADIOv3-L's architecture at tiny width, weights from `teacher_path`."""
from openvla_align.teachers.radio import build_radio_teacher
from openvla_align.tiny.model import TINY_VIT as TINY_ARCH


def tiny_c_radio(path=None, resolution=None, grid=(16, 16), allow_random=False, trust_remote_code=False, arch=None):
    return build_radio_teacher("c-radio-v3-l", path, resolution, grid, allow_random, trust_remote_code, TINY_ARCH)
'''


VGGT_PLUGIN = '''
"""A third-party teacher: VGGT-1B's aggregator at tiny width, weights (a model.pt) from `teacher_path`."""
from openvla_align.teachers import TeacherRequest, teacher_spec
from openvla_align.teachers.vggt import build
from openvla_align.tiny.model import TINY_VIT as TINY_ARCH


def tiny_vggt(path=None, resolution=None, grid=(16, 16), allow_random=False, trust_remote_code=False, arch=None):
    request = TeacherRequest(path, resolution, grid, allow_random, trust_remote_code, TINY_ARCH)
    return build(teacher_spec("vggt-1b"), request)
'''


def write_vggt_plugin(root: os.PathLike, seed: int = 3):
    """``root/site-vggt``: a package registering ``tiny-vggt`` (VGGT's aggregator at ``TINY_VIT`` size) through the
    ``openvla_align.teachers`` entry point, and its weights as a ``model.pt`` laid out as VGGT-1B's (``aggregator.*``
    plus a head's tensor, which the loader ignores). Returns (site, model.pt)."""
    import torch

    from openvla_align.teachers.vggt_model import VGGTAggregator
    from openvla_align.tiny.model import TINY_VIT

    from conftest import write_dist_info

    site = Path(root) / "site-vggt"
    (site / "tiny_vggt_plugin").mkdir(parents=True)
    (site / "tiny_vggt_plugin" / "__init__.py").write_text(VGGT_PLUGIN)
    write_dist_info(site, "openvla_align.teachers", {"tiny-vggt": "tiny_vggt_plugin:tiny_vggt"}, "tiny-vggt-plugin")
    torch.manual_seed(seed)
    state = {f"aggregator.{k}": v for k, v in VGGTAggregator(**TINY_VIT).state_dict().items()}
    state["camera_head.trunk.0.weight"] = torch.zeros(2, 2)
    weights = Path(root) / "vggt" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.save(state, weights)
    return site, weights


def write_teacher_plugin(root: os.PathLike):
    """``root/site``: a package registering the teacher ``tiny-c-radio`` through the ``openvla_align.teachers`` entry
    point (put it on a script's ``PYTHONPATH``), and its weights as an HF snapshot. Returns (site, weights file)."""
    from test_teacher_radio import save_hf_snapshot, tiny_radio_parts

    from conftest import write_dist_info

    site = Path(root) / "site"
    (site / "tiny_teacher_plugin").mkdir(parents=True)
    (site / "tiny_teacher_plugin" / "__init__.py").write_text(TEACHER_PLUGIN)
    entry = {"tiny-c-radio": "tiny_teacher_plugin:tiny_c_radio"}
    write_dist_info(site, "openvla_align.teachers", entry, "tiny-teacher-plugin")
    return site, save_hf_snapshot(tiny_radio_parts(seed=3), Path(root) / "teacher") / "model.safetensors"
