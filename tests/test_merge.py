"""`openvla-align merge`: one offline merge with stock-loadable output, norm_stats folded into config.json."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from openvla_align import AlignConfig
from openvla_align.cli import main
from openvla_align.openvla.plugins import AlignPlugin
from openvla_align.tiny import save_tiny_checkpoint, tiny_teacher
from openvla_align.vla.checkpoint import load_vla

from conftest import cli_fails, make_batch


@pytest.fixture
def run(tmp_path, vla, tokenizer):
    """A base checkpoint and RUN/STEP adapter (with sidecar and dataset statistics) as the patched script saves."""
    base = tmp_path / "base"
    save_tiny_checkpoint(base, vla, tokenizer)
    torch.manual_seed(0)
    model = get_peft_model(
        vla, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="gaussian")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugin = AlignPlugin(AlignConfig(enabled=True, projector_dim=16), tiny_teacher("c-radio-v3-l"))
    plugin.on_model_ready(model)
    step = tmp_path / "run" / "step-000010"
    model.save_pretrained(step)
    plugin.on_save(step)
    stats = {"sft": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    (tmp_path / "run" / "dataset_statistics.json").write_text(json.dumps(stats))
    plugin.on_end()
    return base, step, model


def test_merge_cli(run, tmp_path, tokenizer, capsys):
    base, step, model = run
    out = tmp_path / "merged"
    assert main(["merge", str(step), "--base", str(base), "--out", str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "use unnorm_key='sft'" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["norm_stats"]["sft"]["action"]["mask"][-1] is False
    merged = load_vla(out)  # loads as a plain model, no PEFT
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        merged_keys = set(f.keys())
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        assert merged_keys == set(f.keys())  # stock keys: no LoRA, no alignment weights
    batch = make_batch(tokenizer, 2)
    with torch.no_grad():
        expect = model(**batch).logits
        got = merged.model(**batch).logits
    assert (expect - got).abs().max().item() < 1e-4


def test_merge_refuses_bad_input_and_writes_nothing(run, tmp_path, capsys):
    import shutil

    base, step, _ = run
    cli_fails(capsys, ["merge", str(tmp_path), "--base", str(base)], "not a PEFT adapter directory")
    nowhere = ["merge", str(step), "--base", str(tmp_path / "nowhere")]
    cli_fails(capsys, nowhere, r"argument --base: directory .*nowhere' does not exist", status=2)
    (tmp_path / "taken").mkdir()
    cli_fails(capsys, ["merge", str(step), "--base", str(base), "--out", str(tmp_path / "taken")], "already exists")
    orphan = tmp_path / "orphan"
    shutil.copytree(step, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    cli_fails(capsys, ["merge", str(orphan), "--out", str(tmp_path / "m")], "records no base model.*pass --base")
    assert not (tmp_path / "m").exists()
    assert list((tmp_path / "taken").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temporaries
