"""openvla-align's finetune plugin driven the way the patched finetune.py drives it, on tiny models."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from openvla_align import AlignConfig
from openvla_align.config import SPATIAL_FORCING
from openvla_align.openvla.env import environment_problems, warn_if_broken
from openvla_align.openvla.plugins import (
    ENTRY_POINT_GROUP,
    PLUGINS,
    AlignPlugin,
    FinetunePlugin,
    FreezeConfig,
    FreezePlugin,
    NormStatsConfig,
    NormStatsPlugin,
    load_reference_projector,
)
from openvla_align.teachers import TeacherWeightsNotFound
from openvla_align.tiny import tiny_teacher

from conftest import make_batch


def _teacher():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_teacher("c-radio-v3-l")


def _lora(vla):
    torch.manual_seed(0)
    return get_peft_model(vla, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="gaussian"))


def _steps(model, plugin, tokenizer, n=2, extra=()):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if extra:
        opt.add_param_group({"params": list(extra)})
    model.train()
    metrics = {}
    for step in range(n):
        batch = make_batch(tokenizer, 2, seed=step)
        out = model(**batch)
        term, metrics = plugin.loss(model, batch, out, step)
        loss = out.loss if term is None else out.loss + term
        opt.zero_grad()
        loss.backward()
        opt.step()
    return metrics


def test_disabled_plugin_changes_nothing(vla, tokenizer):
    plugin = AlignPlugin(AlignConfig(enabled=False))
    model = _lora(vla)
    assert plugin.on_model_ready(model) == []
    batch = make_batch(tokenizer, 2)
    out = model(**batch)
    assert plugin.loss(model, batch, out, 0) == (None, {})
    assert isinstance(plugin, FinetunePlugin) and plugin.name == "align" and plugin.config_cls is AlignConfig


def test_train_save_resume(vla, tokenizer, tmp_path):
    cfg = AlignConfig(enabled=True, layers=(8, 16), projector_dim=32)
    plugin = AlignPlugin(cfg, teacher=_teacher())
    model = _lora(vla)
    assert plugin.on_model_ready(model) == []  # frozen projector: nothing extra for the optimizer
    metrics = _steps(model, plugin, tokenizer)
    assert {"align/loss", "align/cos_layer8", "align/cos_layer16"} <= set(metrics)
    plugin.on_save(tmp_path / "step-2")
    assert (tmp_path / "step-2" / "align" / "projector.safetensors").is_file()
    fp = plugin.aligner.fingerprint()
    plugin.on_end()

    resumed = AlignPlugin(AlignConfig(enabled=True, layers=(8, 16), projector_dim=32, projector_seed=5), _teacher())
    resumed.on_model_ready(model)
    assert resumed.aligner.fingerprint() != fp  # another seed builds another projector ...
    with pytest.raises(ValueError, match=r"layers: saved \(8, 16\), now \(16,\)"):
        other = AlignPlugin(AlignConfig(enabled=True, layers=(16,), projector_dim=32), _teacher())
        other.on_model_ready(model)
        other.on_resume(tmp_path / "step-2")
    assert other.aligner.fingerprint() != fp  # ... and a refused resume changed nothing
    resumed.on_resume(tmp_path / "step-2")
    assert resumed.aligner.fingerprint() == fp  # ... which the resume replaces with the saved one


def test_resume_refuses_corrupt_sidecar(vla, tmp_path):
    plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=32), _teacher())
    plugin.on_model_ready(vla)
    plugin.on_save(tmp_path)
    (tmp_path / "align" / "projector.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        plugin.on_resume(tmp_path)


def test_trainable_projector_goes_to_the_optimizer(vla, tokenizer):
    plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=32, freeze_projector=False), _teacher())
    model = _lora(vla)
    extra = plugin.on_model_ready(model)
    assert len(extra) == 8
    before = plugin.aligner.fingerprint()
    _steps(model, plugin, tokenizer, n=1, extra=extra)
    assert plugin.aligner.fingerprint() != before


def test_resume_restores_a_trainable_projector_in_place(vla, tmp_path):
    cfg = AlignConfig(enabled=True, projector_dim=32, freeze_projector=False)
    saved = AlignPlugin(cfg, _teacher())
    saved.on_model_ready(vla)
    with torch.no_grad():
        for p in saved.aligner.projectors.parameters():
            p.add_(1.0)
    saved.on_save(tmp_path)
    saved.on_end()
    resumed = AlignPlugin(cfg, _teacher())
    extra = resumed.on_model_ready(vla)  # these objects are what the optimizer holds
    resumed.on_resume(tmp_path)
    assert all(a is b for a, b in zip(extra, resumed.aligner.projectors.parameters()))
    assert resumed.aligner.fingerprint() == saved.aligner.fingerprint()


def test_trainable_projector_optimizer_state_is_saved_and_restored(vla, tokenizer, tmp_path):
    """OpenVLA-OFT's script hands its optimizer over (``on_optimizer``) and saves no optimizer state of its own: the
    sidecar keeps the projector's AdamW moments and step, and resume puts them back on the same parameter objects."""
    from safetensors.torch import load_file

    from openvla_align.openvla.plugins.align import OPTIMIZER_NAME

    cfg = AlignConfig(
        enabled=True, teacher="c-radio-v3-l", projector="spatial-forcing", freeze_projector=False,
        loss="one-minus-cosine", coeff=0.5, layers=(8,),
    )  # fmt: skip
    model = _lora(vla)
    plugin = AlignPlugin(cfg, _teacher())
    extra = plugin.on_model_ready(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.add_param_group({"params": extra})
    plugin.on_optimizer(opt)
    for step in range(2):
        batch = make_batch(tokenizer, 2, seed=step)
        out = model(**batch)
        term, _ = plugin.loss(model, batch, out, step)
        opt.zero_grad()
        (out.loss + term).backward()
        opt.step()
    plugin.on_save(tmp_path)
    saved = load_file(str(tmp_path / "align" / OPTIMIZER_NAME))
    assert len(saved) == 3 * len(extra) and all(v.shape == () for k, v in saved.items() if k.endswith("/step"))
    assert {v.item() for k, v in saved.items() if k.endswith("/step")} == {2.0}
    expect = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in plugin._trainable().items()}
    plugin.on_end()

    resumed = AlignPlugin(cfg, _teacher())
    extra2 = resumed.on_model_ready(model)
    opt2 = torch.optim.AdamW(extra2, lr=1e-3)
    resumed.on_optimizer(opt2)
    resumed.on_resume(tmp_path)
    for name, param in resumed._trainable().items():
        for key, value in expect[name].items():
            torch.testing.assert_close(opt2.state[param][key], value, atol=0, rtol=0)
    assert resumed.aligner.fingerprint() == plugin.aligner.fingerprint()
    resumed.on_end()

    # a frozen-projector config cannot resume a trainable projector's sidecar: one line, before the model loads
    frozen = AlignPlugin(AlignConfig(**{**cfg.to_dict(), "freeze_projector": True}), _teacher())
    with pytest.raises(ValueError, match="freeze_projector: saved False, now True"):
        frozen.check_sidecar(tmp_path / "align", None)
    (tmp_path / "align" / OPTIMIZER_NAME).write_bytes(b"garbage")
    broken = AlignPlugin(cfg, _teacher())
    broken.on_model_ready(model)
    broken.on_optimizer(torch.optim.AdamW(broken.aligner.trainable_parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        broken.on_resume(tmp_path)


def test_two_alignment_terms_at_once(vla, tokenizer, tmp_path):
    """``align`` (C-RADIO at layer 4, BlindVLA's frozen MLP) and ``align2`` (VGGT at layer 6, Spatial Forcing's
    trainable projector) on one model: two hooks, two loss terms, metrics under their own names, a sidecar each."""
    from openvla_align.aligner import Aligner
    from openvla_align.openvla.plugins import SecondAlignPlugin
    from openvla_align.tiny import tiny_teacher

    first = AlignPlugin(AlignConfig(enabled=True, layers=(4,), projector_dim=32), _teacher())
    sf = AlignConfig(**{**SPATIAL_FORCING, "layers": (6,)}, enabled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = SecondAlignPlugin(sf, tiny_teacher("vggt-1b", resolution=70))
    model = _lora(vla)
    extra = first.on_model_ready(model) + second.on_model_ready(model)
    assert extra and all(p.requires_grad for p in extra)  # only the trainable projector's
    batch = make_batch(tokenizer, 2)
    out = model(**batch)
    (t1, m1), (t2, m2) = first.loss(model, batch, out, 0), second.loss(model, batch, out, 0)
    assert set(m1) == {"align/loss", "align/cos_layer4", "align/loss_layer4"}
    assert set(m2) == {"align2/loss", "align2/cos_layer6", "align2/loss_layer6"}
    assert 0 < t2.item() <= 1.0 and -0.2 <= t1.item() <= 0.2
    (out.loss + t1 + t2).backward()
    assert all(p.grad is not None for p in extra)
    first.on_save(tmp_path)
    second.on_save(tmp_path)
    assert Aligner.load(tmp_path / "align", target_width=first.aligner.teacher_width).config.layers == (4,)
    assert Aligner.load(tmp_path / "align2", target_width=64).config.teacher == "vggt-1b"
    first.on_end()
    second.on_end()


class _Cfg:
    data_root_dir, dataset_name = "unused", "sft"


def test_each_plugin_is_an_installed_entry_point_with_one_job():
    from importlib.metadata import entry_points

    eps = entry_points()
    eps = eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, [])
    installed = {ep.name: ep.load() for ep in eps}
    assert {cls.name: cls for cls in PLUGINS} == {
        name: installed[name] for name in ("align", "align2", "datasets", "freeze", "norm_stats")
    }
    assert [cls.name for cls in PLUGINS] == sorted(cls.name for cls in PLUGINS)  # the script's order


def test_merged_model_gets_norm_stats_and_the_unnorm_key_is_printed(tmp_path, capsys):
    """Aligned or not (the SFT and Freeze baselines), every merged model carries the run's dataset statistics."""
    import json

    plugin = NormStatsPlugin(NormStatsConfig())
    plugin.setup(_Cfg(), is_main_process=True)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"norm_stats": {"bridge_orig": {"action": {}}}, "x": 1}))
    plugin.on_merged(merged)  # no statistics beside the model: nothing to fold, nothing changed
    assert json.loads((merged / "config.json").read_text())["norm_stats"] == {"bridge_orig": {"action": {}}}
    stats = {"sft": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}, "num_transitions": 5}}
    (merged / "dataset_statistics.json").write_text(json.dumps(stats))
    before = (merged / "config.json").read_bytes()
    NormStatsPlugin(NormStatsConfig(fold=False)).on_merged(merged)  # --norm_stats.fold false: untouched
    assert (merged / "config.json").read_bytes() == before
    plugin.on_merged(merged)
    config = json.loads((merged / "config.json").read_text())
    assert config["x"] == 1 and set(config["norm_stats"]) == {"bridge_orig", "sft"}
    assert config["norm_stats"]["sft"] == stats["sft"]
    plugin.on_end()
    assert "use unnorm_key='sft' (available: sft)" in capsys.readouterr().out

    (merged / "dataset_statistics.json").write_text("{not json")
    before = (merged / "config.json").read_bytes()
    with pytest.raises(ValueError, match="Cannot fold"):
        plugin.on_merged(merged)
    assert (merged / "config.json").read_bytes() == before


@pytest.mark.parametrize("enabled", [True, False], ids=["align", "sft-baseline"])
def test_adapter_only_run_says_how_to_merge(vla, tmp_path, capsys, enabled):
    plugins = [
        AlignPlugin(AlignConfig(enabled=enabled, projector_dim=32), _teacher()),
        NormStatsPlugin(NormStatsConfig()),
    ]
    for plugin in plugins:
        plugin.setup(_Cfg(), is_main_process=True)
        plugin.on_model_ready(vla)
    for plugin in plugins:
        plugin.on_save(tmp_path)
    for plugin in plugins:
        plugin.on_end()
    assert "openvla-align merge" in capsys.readouterr().out
    assert (tmp_path / "align").is_dir() == enabled  # a sidecar only for an aligned run


def test_reference_projector_imports(tmp_path, vla):
    ref = torch.nn.Module()
    ref.net = torch.nn.Sequential(
        torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 32),
        torch.nn.SiLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(32, 32),
        torch.nn.SiLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(32, 32),
    )  # the reference's AlignmentProjector layout, saved as its state_dict
    (tmp_path / "alignment_projector").mkdir()
    torch.save(ref.state_dict(), tmp_path / "alignment_projector" / "pytorch_model.bin")
    state = load_reference_projector(tmp_path / "alignment_projector")
    plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=32), _teacher())
    plugin.on_model_ready(vla)
    plugin.aligner.load_projectors(state)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(plugin.aligner.projectors["16"](x), ref.eval().net(x))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="not a reference alignment projector"):
        load_reference_projector(tmp_path / "bad.bin")


def test_environment_warnings():
    ok = {"transformers": "4.40.1", "timm": "0.9.10", "torch": "2.2.0", "tokenizers": "0.19.1", "peft": "0.11.1"}
    assert environment_problems(ok) == []
    bad = dict(ok, transformers="4.50.0", timm="1.0.3")
    problems = environment_problems(bad)
    assert any("transformers 4.50.0" in p and "without the image" in p for p in problems)
    assert any("timm 1.0.3" in p for p in problems)
    with pytest.warns(UserWarning, match="breaks OpenVLA fine-tuning: transformers 4.50.0"):
        warn_if_broken(bad)


def test_layers_beyond_depth_fail_before_the_model_loads(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 18}}))

    class Cfg(_Cfg):
        vla_path = str(tmp_path)

    AlignPlugin(AlignConfig(enabled=True, layers=(16, 18)), _teacher()).setup(Cfg())
    with pytest.raises(ValueError, match=r"Layer\(s\) \[20\] out of range: this LLM has 18 decoder blocks"):
        AlignPlugin(AlignConfig(enabled=True, layers=(16, 20)), _teacher()).setup(Cfg())
    Cfg.vla_path = "openvla/openvla-7b"  # a hub id: checked once the model is loaded (attach)
    AlignPlugin(AlignConfig(enabled=True, layers=(40,)), _teacher()).setup(Cfg())


def test_an_unregistered_loss_or_projector_fails_before_the_model_loads():
    """Losses and projectors are registered once, in their own modules; the plugin checks the names in setup."""
    with pytest.raises(ValueError, match="Unknown alignment loss 'kl'; known: cosine, one-minus-cosine, l2, ntxent"):
        AlignPlugin(AlignConfig(enabled=True, loss="kl"), _teacher()).setup(_Cfg())
    with pytest.raises(ValueError, match="Unknown projector 'conv'; known: mlp, linear, cosine"):
        AlignPlugin(AlignConfig(enabled=True, projector="conv"), _teacher()).setup(_Cfg())
    with pytest.raises(ValueError, match="Unknown pooling 'area'; known: resample, bilinear-corners"):
        AlignPlugin(AlignConfig(enabled=True, pooling="area"), _teacher()).setup(_Cfg())
    with pytest.raises(ValueError, match="Unknown teacher input 'raw'; known: reference, spatial-forcing"):
        AlignPlugin(AlignConfig(enabled=True, teacher_input="raw"), _teacher()).setup(_Cfg())


def test_teacher_is_built_in_setup_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="Unknown teacher 'c-radio-v9'"):
        AlignPlugin(AlignConfig(enabled=True, teacher="c-radio-v9")).setup(_Cfg())
    with pytest.raises(TeacherWeightsNotFound, match="c-radio-v3-l"):
        AlignPlugin(AlignConfig(enabled=True)).setup(_Cfg())
    plugin = AlignPlugin(AlignConfig(enabled=True, teacher="dinov2-vit-s", allow_random_teacher=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugin.setup(_Cfg())
    assert plugin.teacher is not None and plugin.teacher.width == 384 and plugin.aligner is None


@pytest.mark.parametrize("spelling", ["freeze.vision", "align.freeze_vision"])
def test_freeze_vision_leaves_no_vision_gradient_with_or_without_alignment(vla, tokenizer, spelling):
    model = _lora(vla)
    vision = [n for n, p in model.named_parameters() if "vision_backbone" in n and p.requires_grad]
    assert vision and all("lora_" in n for n in vision)  # LoRA adapters on the vision towers are trainable ...
    old = spelling == "align.freeze_vision"
    cfg = SimpleNamespace(align=AlignConfig(enabled=False, freeze_vision=old), dataset_name="sft")
    align, freeze = AlignPlugin(cfg.align), FreezePlugin(FreezeConfig(vision=not old))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for plugin in (align, freeze):
            plugin.setup(cfg)
    said = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert said == (
        [
            "--align.freeze_vision is now --freeze.vision (in a recipe: `freeze:` / `vision: true`); the old "
            "spelling still works and will be removed in a later release."
        ]
        if old
        else []
    )
    assert freeze.config.vision and align.on_model_ready(model) == [] and freeze.on_model_ready(model) == []
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("vision_backbone" in n for n in trainable)  # ... and none after the switch
    assert any("language_model" in n for n in trainable)
    _steps(model, align, tokenizer, n=1)
    assert all(p.grad is None for n, p in model.named_parameters() if "vision_backbone" in n)


def test_freeze_off_freezes_nothing(vla):
    model = _lora(vla)
    before = [n for n, p in model.named_parameters() if p.requires_grad]
    plugin = FreezePlugin(FreezeConfig())
    plugin.setup(SimpleNamespace(align=AlignConfig()))
    assert not plugin.config.vision and plugin.on_model_ready(model) == []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before


def test_a_multi_view_teacher_with_images_primary_warns_once_in_setup(caplog):
    """Decided and documented: with --align.images primary a multi-view teacher (VGGT) sees the third-person camera
    alone; setup says so (Spatial Forcing feeds every camera)."""
    import logging

    from openvla_align.tiny import tiny_teacher

    class OftCfg:  # OpenVLA-OFT's FinetuneConfig, as the host registry recognises it
        vla_path, num_images_in_input, resume, image_aug = "unused", 2, False, False
        data_root_dir, dataset_name = "unused", "sft"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vggt = tiny_teacher("vggt-1b", resolution=70)
    with caplog.at_level(logging.WARNING, logger="openvla_align"):
        AlignPlugin(AlignConfig(enabled=True, teacher="vggt-1b", images="primary"), vggt).setup(OftCfg())
        AlignPlugin(AlignConfig(enabled=True, teacher="vggt-1b"), vggt).setup(OftCfg())
    said = [r.getMessage() for r in caplog.records if "multi-view teacher" in r.getMessage()]
    assert len(said) == 1 and "third-person camera alone" in said[0]
