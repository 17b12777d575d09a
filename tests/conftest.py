import numpy as np
import pytest
import torch
import torch.nn as nn

from openvla_align.teachers import Teacher, TeacherSpec
from openvla_align.tiny import build_tiny_vla, build_tokenizer
from openvla_align.tiny.data import collate, generate_scenes
from openvla_align.vla.actions import ActionTokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def vla(tokenizer):
    return build_tiny_vla(seed=0, vocab_size=len(tokenizer))


class PatchTeacher(Teacher):
    """Test-local teacher: one conv patchifier (enough to exercise the Teacher contract)."""

    def __init__(self, width=24, patch=16, grid=(16, 16), resolution=None):
        spec = TeacherSpec("patch-test", "test", width, patch, (0.5,) * 3, (0.5,) * 3, 0, "nowhere")
        super().__init__(spec, resolution=resolution, grid=grid)
        torch.manual_seed(123)
        self.conv = nn.Conv2d(3, width, patch, patch)
        self.freeze()

    def _features(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


@pytest.fixture
def teacher():
    return PatchTeacher()


def make_batch(tokenizer, batch_size=2, seed=0, pad_to=0):
    """A right-padded OpenVLA-layout batch of generated scenes with random (not normalised-image) pixel values."""
    scenes = generate_scenes(batch_size, seed=seed, size=224)
    batch = collate(scenes, np.arange(batch_size), tokenizer, ActionTokenizer(len(tokenizer)), pad_to=pad_to)
    batch["pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=torch.Generator().manual_seed(seed))
    return batch


@pytest.fixture
def batch(tokenizer):
    return make_batch(tokenizer)


@pytest.fixture(autouse=True)
def _hermetic_weight_dirs(tmp_path_factory, monkeypatch):
    """No test may see (or depend on) teacher weights cached on the machine running it."""
    root = tmp_path_factory.mktemp("weights")
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cli_fails(capsys, argv, match, status=1):
    """Run the CLI on bad input: exit status 1 (``status=2``: a usage error, which argparse raises as SystemExit)
    and one line on stderr naming the command, matching ``match``; nothing on stdout."""
    import re

    from openvla_align.cli import main

    capsys.readouterr()
    if status == 2:
        with pytest.raises(SystemExit) as exit_:
            main(list(argv))
        assert exit_.value.code == 2
    else:
        assert main(list(argv)) == status
    out, err = capsys.readouterr()
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"openvla-align {argv[0]}") and re.search(match, err), err
    assert not out.strip(), out
    return err


def write_dist_info(root, group, targets, name="standin-plugins"):
    """``root/<name>.dist-info``: an installed distribution registering ``targets`` ({entry: "mod:attr"}) under the
    entry-point ``group``; ``importlib.metadata`` finds it once ``root`` is on ``sys.path`` (of this process or a
    script's ``PYTHONPATH``)."""
    from pathlib import Path

    info = Path(root) / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in targets.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info


def install_entry_points(root, monkeypatch, group, targets, name="standin-plugins"):
    """:func:`write_dist_info` on this process's ``sys.path`` for one test."""
    write_dist_info(root, group, targets, name)
    monkeypatch.syspath_prepend(str(root))


def first_missing(modules):
    """The first of ``modules`` that does not import here (a missing parent package counts), else None."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return module
    return None
