import json
import sys

import pytest

from openvla_align.config import AlignConfig


def test_paper_defaults():
    cfg = AlignConfig()
    assert (cfg.enabled, cfg.teacher, cfg.layers, cfg.coeff, cfg.loss) == (False, "c-radio-v3-l", (16,), 0.2, "cosine")
    assert (cfg.projector, cfg.projector_dim, cfg.freeze_projector, cfg.target) == ("mlp", 2048, True, "backbone")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=(0,)), "layers start at 1"),
        (dict(layers=()), "layers is empty"),
        (dict(layers=(16, 16)), "repeats a layer"),
        (dict(target="llm"), "AlignConfig.target='llm' is not one of"),
        (dict(coeff=0.0), "AlignConfig.coeff=0.0 must be > 0"),
        (dict(target="encoder", layers=(8, 16)), "use target='backbone' for several LLM layers"),
    ],
)
def test_validation_names_field_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignConfig(**kwargs)


def test_json_round_trip_tolerates_newer_keys():
    cfg = AlignConfig(enabled=True, layers=(8, 16), coeff=0.5)
    data = json.loads(cfg.to_json())
    assert list(data) == sorted(data)
    assert AlignConfig.from_dict(data) == cfg
    data["from_the_future"] = 1
    with pytest.warns(UserWarning, match=r"does not know: \['from_the_future'\]"):
        assert AlignConfig.from_dict(data) == cfg


def test_draccus_parses_cli_flags(monkeypatch):
    import draccus

    monkeypatch.setattr(sys, "argv", ["x", "--enabled", "true", "--layers", "[8,16]", "--teacher", "dinov2-vit-l"])
    cfg = draccus.parse(AlignConfig)
    assert cfg.enabled and cfg.layers == (8, 16) and cfg.teacher == "dinov2-vit-l"


def test_draccus_help_lists_field_help(monkeypatch, capsys):
    import draccus

    monkeypatch.setattr(sys, "argv", ["x", "--help"])
    with pytest.raises(SystemExit):
        draccus.parse(AlignConfig)
    assert "Weight of the alignment loss" in capsys.readouterr().out
