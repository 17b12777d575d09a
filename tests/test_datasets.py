"""Registering the paper's datasets into OpenVLA's registries, and the early dataset check."""

import os
import sys
import textwrap
from types import SimpleNamespace

import pytest

from openvla_align.openvla.datasets import PAPER_DATASETS, check_dataset, register_paper_datasets
from openvla_align.openvla.plugins import DatasetsConfig, DatasetsPlugin

STAND_IN = {
    "configs.py": """
        from enum import IntEnum
        class StateEncoding(IntEnum):
            NONE = -1
        class ActionEncoding(IntEnum):
            EEF_POS = 1
        OXE_DATASET_CONFIGS = {"bridge_orig": {"image_obs_keys": {"primary": "image_0"}}}
    """,
    "transforms.py": "OXE_STANDARDIZATION_TRANSFORMS = {'bridge_orig': lambda t: t}\n",
    "mixtures.py": "OXE_NAMED_MIXTURES = {'bridge_mix': [('bridge_orig', 1.0)]}\n",
}


def _clear_prismatic():
    for name in [m for m in sys.modules if m == "prismatic" or m.startswith("prismatic.")]:
        del sys.modules[name]


@pytest.fixture
def prismatic(tmp_path, monkeypatch):
    """A stand-in with upstream's module paths and registry names (the real one needs tensorflow; see below)."""
    pkg = tmp_path / "src" / "prismatic" / "vla" / "datasets" / "rlds" / "oxe"
    pkg.mkdir(parents=True)
    for part in pkg.relative_to(tmp_path / "src").parents:
        (tmp_path / "src" / part / "__init__.py").touch()
    (pkg / "__init__.py").touch()
    for name, body in STAND_IN.items():
        (pkg / name).write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    _clear_prismatic()
    yield
    _clear_prismatic()


def test_registers_once_with_the_papers_settings(prismatic):
    assert register_paper_datasets() == list(PAPER_DATASETS)
    assert register_paper_datasets() == []  # idempotent
    from prismatic.vla.datasets.rlds.oxe import configs, transforms

    for name in PAPER_DATASETS:
        cfg = configs.OXE_DATASET_CONFIGS[name]
        assert cfg["image_obs_keys"] == {"primary": "image"} and cfg["depth_obs_keys"] == {}
        assert cfg["state_obs_keys"] == [] and cfg["action_encoding"] is configs.ActionEncoding.EEF_POS
        traj = {"action": [1]}
        assert transforms.OXE_STANDARDIZATION_TRANSFORMS[name](traj) is traj


def test_check_dataset(prismatic, tmp_path):
    register_paper_datasets()
    root = tmp_path / "rlds"
    with pytest.raises(ValueError, match="'nope' is neither a registered dataset nor a named mixture"):
        check_dataset(root, "nope")
    with pytest.raises(FileNotFoundError, match=r"lacks the RLDS build of \['sft'\].*sft/<version>/dataset_info.json"):
        check_dataset(root, "sft")
    (root / "sft" / "1.0.0").mkdir(parents=True)
    (root / "sft" / "1.0.0" / "dataset_info.json").write_text("{}")
    assert check_dataset(root, "sft") == root
    with pytest.raises(FileNotFoundError, match=r"\['bridge_orig'\]"):
        check_dataset(root, "bridge_mix")


def test_plugin_registers_and_checks_before_the_model_loads(prismatic, tmp_path):
    plugin = DatasetsPlugin(DatasetsConfig())
    with pytest.raises(FileNotFoundError, match=r"lacks the RLDS build.*--datasets\.check false skips this check"):
        plugin.setup(SimpleNamespace(data_root_dir=tmp_path, dataset_name="warmup"))
    from prismatic.vla.datasets.rlds.oxe import configs

    assert set(PAPER_DATASETS) <= set(configs.OXE_DATASET_CONFIGS)  # registered before the check
    with pytest.raises(ValueError, match="'nope' is neither"):
        plugin.setup(SimpleNamespace(data_root_dir=tmp_path, dataset_name="nope"))
    (tmp_path / "warmup" / "1.0.0").mkdir(parents=True)
    (tmp_path / "warmup" / "1.0.0" / "dataset_info.json").write_text("{}")
    plugin.setup(SimpleNamespace(data_root_dir=tmp_path, dataset_name="warmup"))
    # a remote build (tensorflow-datasets reads gs:// itself) is not looked for on the local disk
    plugin.setup(SimpleNamespace(data_root_dir="gs://bucket/rlds", dataset_name="bridge_orig"))


@pytest.mark.skipif(not os.environ.get("OPENVLA_SRC"), reason="set OPENVLA_SRC to an OpenVLA checkout to run")
def test_real_registries(monkeypatch):
    pytest.importorskip("tensorflow", reason="upstream's transforms module imports tensorflow")
    monkeypatch.syspath_prepend(os.environ["OPENVLA_SRC"])
    _clear_prismatic()
    register_paper_datasets()
    from prismatic.vla.datasets.rlds.oxe.materialize import make_oxe_dataset_kwargs

    kwargs = make_oxe_dataset_kwargs("sft", "/data")
    assert kwargs["image_obs_keys"] == {"primary": "image"} and kwargs["action_normalization_mask"][-1] is False


def test_each_half_of_the_plugin_switches_off(prismatic, tmp_path):
    DatasetsPlugin(DatasetsConfig(check=False)).setup(SimpleNamespace(data_root_dir=tmp_path, dataset_name="nope"))
    from prismatic.vla.datasets.rlds.oxe import configs

    assert set(PAPER_DATASETS) <= set(configs.OXE_DATASET_CONFIGS)
    for name in PAPER_DATASETS:
        del configs.OXE_DATASET_CONFIGS[name]
    off = DatasetsPlugin(DatasetsConfig(register_paper=False, check=False))
    off.setup(SimpleNamespace(data_root_dir=tmp_path, dataset_name="sft"))
    assert not set(PAPER_DATASETS) & set(configs.OXE_DATASET_CONFIGS)
    with pytest.raises(ValueError, match="'sft' is neither"):  # unregistered: the check says so
        DatasetsPlugin(DatasetsConfig(register_paper=False)).setup(
            SimpleNamespace(data_root_dir=tmp_path, dataset_name="sft")
        )


def test_our_loggers_survive_prismatic_logging_setup(prismatic):
    """Upstream's `prismatic.overwatch` disables every existing logger (dictConfig, disable_existing_loggers=True)."""
    import logging

    ours = logging.getLogger("openvla_align.probe.linear")
    ours.disabled = True  # what importing prismatic does to loggers created before it
    register_paper_datasets()
    assert not ours.disabled
