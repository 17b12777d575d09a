"""openvla-align: Visual Representation Alignment for OpenVLA fine-tuning (arXiv 2510.25616)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="openvla-align",
    version="0.1.0",
    description="Visual Representation Alignment for OpenVLA LoRA fine-tuning, as a plugin for the stock scripts.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["openvla_align", "openvla_align.*"]),
    package_data={"openvla_align.openvla": ["patches/*.md", "patches/*/*.patch", "patches/*/*.json"]},
    # Ranges admit OpenVLA's pins (torch 2.2, transformers 4.40.1, timm 0.9.10, peft 0.11.1, draccus 0.8.0,
    # tokenizers 0.19.1) as well as current releases; torch itself is left to the user's environment.
    install_requires=[
        "torch>=2.2",
        "timm>=0.9.10",
        "transformers>=4.40.1",
        "tokenizers>=0.19.1",
        "peft>=0.11.1",
        "draccus>=0.8.0",
        "safetensors>=0.4.1",
        "numpy",
        "tqdm",
        "packaging",
        "pillow",
    ],
    extras_require={
        "demo": ["matplotlib>=3.7"],
        "probe": ["matplotlib>=3.7", "scikit-learn>=1.3"],
        # einops: Spatial Forcing's pooling code, which the tests import from shared/upstream to compare against
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "matplotlib>=3.7", "scikit-learn>=1.3", "einops"],
    },
    entry_points={
        "console_scripts": ["openvla-align=openvla_align.cli:main"],
        # The built-ins as data (spec + family module, imported when one of them is created).
        "openvla_align.teachers": ["builtin=openvla_align.teachers.catalog"],
        # config.json model_type -> loader of checkpoints of other classes with OpenVLA's layout (vla/checkpoint.py).
        "openvla_align.checkpoint_loaders": ["tiny_openvla=openvla_align.tiny.model:load_tiny_checkpoint"],
        # A recipe's `simulator:` -> environment class with SimplerEnv's contract (eval/simulators.py).
        "openvla_align.simulators": [
            "simpler=openvla_align.eval.simpler:SimplerEnv",
            "libero=openvla_align.eval.libero:LiberoEnv",
        ],
        # The generic plugin group the patched vla-scripts/finetune.py discovers (see patches/).
        "openvla.finetune_plugins": [
            "align=openvla_align.openvla.plugins.align:AlignPlugin",
            "align2=openvla_align.openvla.plugins.align:SecondAlignPlugin",
            "datasets=openvla_align.openvla.plugins.datasets:DatasetsPlugin",
            "freeze=openvla_align.openvla.plugins.freeze:FreezePlugin",
            "norm_stats=openvla_align.openvla.plugins.norm_stats:NormStatsPlugin",
        ],
    },
)
