import json

from openvla_align.cli import main
from openvla_align.demo import DemoConfig, linear_probe, run_demo


def test_teachers_command_lists_width_grid_and_weights(capsys):
    assert main(["teachers", "c-radio-v3-*"]) == 0
    out = capsys.readouterr().out
    assert "c-radio-v3-l" in out and "1024" in out and "16x16" in out and "nvidia/C-RADIOv3-L" in out
    assert "dinov2" not in out


def test_demo_end_to_end(tmp_path, capsys):
    cfg = DemoConfig(out_dir=str(tmp_path / "demo"), steps=3, batch_size=4, n_train=12, n_heldout=8)
    summary = run_demo(cfg)
    out = capsys.readouterr().out
    assert "tiny random-weight models" in out and "SFT+Align" in out and "(OK)" in out
    assert "held-out action loss (lower is better)" in out and "linear probe (shape), layer 16 (higher)" in out
    assert f"{tmp_path / 'demo'}/base (the tiny base checkpoint)" in out
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for run in ("sft", "align"):
        r = metrics["results"][run]
        assert {
            "action_loss",
            "token_accuracy",
            "align/cos_layer16",
            "linear_probe_shape_layer16",
            "linear_probe_color_layer16",
        } <= set(r)
        assert (tmp_path / "demo" / run / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "demo" / "align" / "adapter" / "align" / "projector.safetensors").is_file()
    assert not (tmp_path / "demo" / "sft" / "adapter" / "align").exists()
    assert metrics["results"]["align"]["reload_max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    assert len(summary["history"]["align"]) == 3


def test_linear_probe_separable_vs_shuffled():
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.randn(90, 16, generator=g) * 0.3
    x[torch.arange(90), y] += 3.0  # linearly separable by construction
    assert linear_probe(x[:60], y[:60], x[60:], y[60:]) == 1.0
    noise = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 3, (300,), generator=g)
    assert linear_probe(noise[:200], labels[:200], noise[200:], labels[200:]) < 0.5
