"""The real patched ``vla-scripts/finetune.py`` end to end, with ``--align.enabled true``, on CPU.

Opt-in: needs ``OPENVLA_SRC`` (an OpenVLA checkout) and OpenVLA's own stack (tensorflow, tensorflow_datasets, dlimp,
timm 0.9.x, transformers 4.40.1, peft, wandb) with this package pip-installed (its entry points must be visible).
Everything is real except the CUDA-only calls, which ``_cpu_shim`` maps to CPU/gloo (the shim lives in tests,
never in the patch): upstream's ``OpenVLAForActionPrediction`` at tiny size, upstream's RLDS pipeline over a
generated 6-episode tfds build, PEFT LoRA, upstream's merge, and a teacher installed by a third-party entry point
(the C-RADIOv3 architecture at tiny width, loaded from a file in RADIO's HF layout). Then the stock loaders read
what the script wrote.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import _proc
import pytest
from test_upstream_assets import _stack_available

from openvla_align.tiny.openvla import write_pico_sitecustomize

TESTS_DIR = Path(__file__).resolve().parent


def _installed() -> bool:
    """Is the `align` finetune plugin visible to a fresh interpreter outside the source tree (as the script sees it)?"""
    code = "import importlib.metadata as m; print([e.name for e in m.entry_points(group='openvla.finetune_plugins')])"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True).stdout
    return "'align'" in out


_OK, _WHY = _stack_available()
if _OK and not _installed():
    _OK, _WHY = False, "openvla-align is not pip-installed here (its `openvla.finetune_plugins` entry point is missing)"
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A patched copy of the checkout, a tiny OpenVLA, a tiny RLDS build and a teacher plugin with its weights."""
    from assets import write_teacher_plugin, write_tiny_rlds

    from openvla_align.cli import main as cli
    from openvla_align.tiny.openvla import build_tiny_openvla_checkpoint

    root = tmp_path_factory.mktemp("e2e")
    checkout = root / "openvla"
    shutil.copytree(os.environ["OPENVLA_SRC"], checkout, ignore=shutil.ignore_patterns(".git", "*.orig"))
    assert cli(["patch", str(checkout)]) == 0
    # The base model knows another dataset's statistics only (as the released 7B): `unnorm_key="sft"` works on a
    # merged model only if the run folded its own statistics in.
    ckpt = build_tiny_openvla_checkpoint(root / "tiny-openvla", seed=0, dataset="bridge_orig")
    write_tiny_rlds(root / "data", name="sft", episodes=6, steps=5, seed=0)

    plugins, weights = write_teacher_plugin(root)
    return dict(root=root, checkout=checkout, ckpt=ckpt, data=root / "data", site=plugins, teacher=weights)


def _env(world) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    home = world["root"] / "home"
    pico = write_pico_sitecustomize(home / "sitecustomize")  # the tiny checkpoint's towers, in every process
    env.update(
        PYTHONPATH=os.pathsep.join([str(world["site"]), str(pico), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HOME=str(home / "hf"),  # remote-code module cache and an empty hub cache
        TORCH_HOME=str(home / "torch"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        PYTHONHASHSEED="0",
    )
    return env


# + --align.teacher_path (see `finetune`). The projector is 64 wide, not 2048: its 2048 x 2048 layer on 512 tokens
# was most of a CPU step's time; the width changes nothing these tests check (the default, 2048, is test_config's).
ALIGN = ("--align.enabled", "true", "--align.teacher", "tiny-c-radio", "--align.projector_dim", "64")


def finetune(world, cwd: Path, *args, nproc: int = 1, check: bool = True, kill_at=None):
    """Run the patched script in ``cwd`` (under torchrun when ``nproc`` > 1); returns (process, logged metrics).
    ``kill_at``: (fault point, occurrence) at which the shim kills the process (see ``_cpu_shim.kill_at``)."""
    cwd.mkdir(parents=True, exist_ok=True)
    argv = ["--vla_path", str(world["ckpt"]), "--data_root_dir", str(world["data"]), "--dataset_name", "sft"]
    argv += ["--run_root_dir", "runs", "--adapter_tmp_dir", "adapters", "--batch_size", "2"]
    argv += ["--shuffle_buffer_size", "64", *args]
    if "tiny-c-radio" in args:
        argv += ["--align.teacher_path", str(world["teacher"])]
    spec = {"script": str(world["checkout"] / "vla-scripts" / "finetune.py"), "argv": argv, "metrics": "metrics.json"}
    spec["pythonpath"] = [str(world["checkout"])]
    if kill_at is not None:
        spec["kill_at"] = list(kill_at)
    (cwd / "spec.json").write_text(json.dumps(spec))
    shim = str(TESTS_DIR / "_cpu_shim.py")
    cmd = [sys.executable, "-W", "ignore", shim, "spec.json"]
    if nproc > 1:
        launcher = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, "--nnodes", "1", "--nproc-per-node", str(nproc), shim, "spec.json"]
    proc = _proc.run(cmd, cwd=cwd, env=_env(world), timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = cwd / "metrics.json"
    return proc, json.loads(metrics.read_text()) if metrics.exists() else []


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def written(cwd: Path) -> list:
    """Files the script wrote in ``cwd`` (not the run spec, the shim's rendezvous file or its metrics record)."""
    return [p for p in cwd.rglob("*") if p.is_file() and not p.name.startswith(("spec.json", "metrics.json"))]


def safetensors_keys(model_dir: Path) -> set:
    from safetensors import safe_open

    keys = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys.update(f.keys())
    return keys


@pytest.fixture(scope="module")
def default_run(world):
    """Stock save mode (merge on every save) with alignment on: 4 steps, saves at 2 and 4."""
    cwd = world["root"] / "default"
    proc, metrics = finetune(world, cwd, "--max_steps", "4", "--save_steps", "2", *ALIGN)
    (exp,) = [p.name for p in (cwd / "runs").iterdir()]
    return dict(cwd=cwd, proc=proc, metrics=metrics, exp=exp)


def test_align_metrics_join_the_script_log(default_run):
    (step0,) = [m for m in default_run["metrics"] if m["step"] == 0]  # the script logs every 10th step
    assert {"train_loss", "action_accuracy", "l1_loss", "align/loss", "align/cos_layer16"} <= set(step0)
    assert -1.0 <= step0["align/cos_layer16"] <= 1.0
    assert step0["align/loss"] == pytest.approx(-0.2 * step0["align/cos_layer16"], abs=1e-3)  # coeff x negative cosine
    assert "Max step 4 reached" in default_run["proc"].stdout


def test_sidecar_beside_the_adapter_and_stock_keys_in_the_merged_model(world, default_run):
    cwd, exp = default_run["cwd"], default_run["exp"]
    adapter, merged = cwd / "adapters" / exp, cwd / "runs" / exp
    assert {"adapter_config.json", "adapter_model.safetensors", "align"} <= {p.name for p in adapter.iterdir()}
    assert sorted(p.name for p in (adapter / "align").iterdir()) == ["config.json", "projector.safetensors"]
    sidecar = json.loads((adapter / "align" / "config.json").read_text())
    assert (sidecar["teacher"], sidecar["layers"], sidecar["coeff"]) == ("tiny-c-radio", [16], 0.2)
    assert "align" not in {p.name for p in merged.iterdir()}
    assert safetensors_keys(merged) == safetensors_keys(world["ckpt"])  # no LoRA, no alignment weights
    stats = json.loads((merged / "dataset_statistics.json").read_text())
    config = json.loads((merged / "config.json").read_text())
    assert config["norm_stats"]["sft"] == stats["sft"]
    assert "use unnorm_key='sft'" in default_run["proc"].stdout
    for root in (cwd / "runs", cwd / "adapters"):  # no staging or previous-checkpoint directories left
        assert [p.name for p in root.iterdir()] == [exp]


PROMPT = "In: What action should the robot take to open the drawer?\nOut:"


def _inputs(processor):
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    inputs = processor(PROMPT, image)
    inputs["pixel_values"] = inputs["pixel_values"].float()
    return inputs


def check_predict_action(merged, processor, merged_dir: Path) -> None:
    """Stock `predict_action(..., unnorm_key="sft")` on the merged model: its action is the greedy action tokens
    un-normalised with the run's own statistics (from `dataset_statistics.json`, not the base model's)."""
    import numpy as np
    import torch

    stats = json.loads((merged_dir / "dataset_statistics.json").read_text())["sft"]["action"]
    assert (
        merged.get_action_stats("sft")["q01"] == stats["q01"] and merged.get_action_stats("sft")["q99"] == stats["q99"]
    )
    inputs = _inputs(processor)
    with torch.no_grad():
        action = merged.predict_action(**inputs, unnorm_key="sft", do_sample=False)
        ids = torch.cat([inputs["input_ids"], torch.tensor([[29871]])], dim=1)  # the "▁" predict_action appends
        tokens = merged.generate(ids, pixel_values=inputs["pixel_values"], max_new_tokens=7, do_sample=False)
    bins = np.clip(merged.vocab_size - tokens[0, -7:].numpy() - 1, 0, 254)
    normalized = merged.bin_centers[bins]
    low, high, mask = (np.asarray(stats[k]) for k in ("q01", "q99", "mask"))
    expect = np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)
    assert action.shape == (7,) and np.allclose(action, expect)


def test_stock_loaders_read_the_checkpoints(world, default_run):
    """`PeftModel.from_pretrained` on the adapter and `AutoModelForVision2Seq` on the merged model agree, and the
    merged model answers `predict_action(..., unnorm_key="sft")` from its own config."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForVision2Seq, AutoProcessor

    cwd, exp = default_run["cwd"], default_run["exp"]
    merged_dir = cwd / "runs" / exp
    processor = AutoProcessor.from_pretrained(merged_dir, trust_remote_code=True)
    merged = AutoModelForVision2Seq.from_pretrained(merged_dir, torch_dtype=torch.float32, trust_remote_code=True)
    base = AutoModelForVision2Seq.from_pretrained(world["ckpt"], torch_dtype=torch.float32, trust_remote_code=True)
    adapted = PeftModel.from_pretrained(base, cwd / "adapters" / exp)
    assert type(merged).__name__ == "OpenVLAForActionPrediction" and isinstance(adapted, PeftModel)

    inputs = _inputs(processor)
    with torch.no_grad():
        a = merged(**inputs).logits
        b = adapted(**inputs).logits
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()  # merged in bf16 by the script
    assert merged.get_action_dim("sft") == 7
    check_predict_action(merged, processor, merged_dir)


@pytest.fixture(scope="module", params=["sft", "freeze"])
def baseline_run(world, request):
    """The paper's baselines through the script with alignment off: plain SFT, and Freeze (vision frozen)."""
    cwd = world["root"] / f"baseline-{request.param}"
    freeze = ("--freeze.vision", "true") if request.param == "freeze" else ()
    proc, metrics = finetune(world, cwd, "--max_steps", "2", "--save_steps", "2", *freeze)
    (exp,) = [p.name for p in (cwd / "runs").iterdir()]
    return dict(kind=request.param, cwd=cwd, proc=proc, metrics=metrics, exp=exp)


def test_baselines_merge_with_their_statistics_and_predict_actions(world, baseline_run):
    """SFT and Freeze runs (alignment off) merge into models that answer `predict_action(..., unnorm_key="sft")`
    with stock loaders; they log no alignment metric and write no sidecar. Freeze leaves the vision backbone as
    the base model has it (up to the script's bf16 merge)."""
    import torch
    from transformers import AutoModelForVision2Seq, AutoProcessor

    cwd, exp = baseline_run["cwd"], baseline_run["exp"]
    merged_dir = cwd / "runs" / exp
    (step0,) = [m for m in baseline_run["metrics"] if m["step"] == 0]
    assert "train_loss" in step0 and not any(k.startswith("align/") for k in step0)
    assert "align" not in {p.name for p in (cwd / "adapters" / exp).iterdir()}
    assert "use unnorm_key='sft'" in baseline_run["proc"].stdout
    assert set(json.loads((merged_dir / "config.json").read_text())["norm_stats"]) == {"bridge_orig", "sft"}

    processor = AutoProcessor.from_pretrained(merged_dir, trust_remote_code=True)
    merged = AutoModelForVision2Seq.from_pretrained(merged_dir, torch_dtype=torch.float32, trust_remote_code=True)
    check_predict_action(merged, processor, merged_dir)

    base = AutoModelForVision2Seq.from_pretrained(world["ckpt"], torch_dtype=torch.float32, trust_remote_code=True)
    moved = [
        name
        for (name, p), q in zip(merged.vision_backbone.named_parameters(), base.vision_backbone.parameters())
        if not torch.equal(p, q.to(torch.bfloat16).float())
    ]
    assert (moved == []) == (baseline_run["kind"] == "freeze"), moved[:3]


@pytest.fixture(scope="module")
def adapter_run(world):
    """Adapter-only checkpoints at steps 2 and 4 (`--merge_on_save false`), every checkpoint kept."""
    cwd = world["root"] / "adapters_only"
    args = ("--max_steps", "4", "--save_steps", "2", "--merge_on_save", "false", "--save_latest_checkpoint_only")
    proc, _ = finetune(world, cwd, *args, "false", *ALIGN)
    exp = min(p.name for p in (cwd / "runs").iterdir())
    return dict(cwd=cwd, proc=proc, exp=exp, args=(*args, "false"))


def test_adapter_only_checkpoints_resume_with_their_sidecar(world, adapter_run):
    cwd, exp = adapter_run["cwd"], adapter_run["exp"]
    ckpt2 = cwd / "runs" / f"{exp}--2_chkpt"
    assert {"trainer_state.pt", "adapter_model.safetensors", "dataset_statistics.json", "align"} <= {
        p.name for p in ckpt2.iterdir()
    }
    assert not (cwd / "adapters").exists() and "openvla-align merge" in adapter_run["proc"].stdout
    resumed = world["root"] / "resumed"
    proc, _ = finetune(world, resumed, *adapter_run["args"], *ALIGN, "--resume_from", str(ckpt2))
    assert "Resumed from" in proc.stdout and "after gradient step 2" in proc.stdout
    ckpt4 = resumed / "runs" / f"{exp}--4_chkpt"
    assert (ckpt4 / "align" / "projector.safetensors").read_bytes() == (
        ckpt2 / "align" / "projector.safetensors"
    ).read_bytes()  # the frozen projector is the one the run started with
    assert not (resumed / "runs" / f"{exp}--2_chkpt").exists()  # steps 3 and 4 only


def test_offline_merge_of_an_adapter_checkpoint(world, adapter_run, capsys):
    from openvla_align.cli import main as cli

    ckpt4 = adapter_run["cwd"] / "runs" / f"{adapter_run['exp']}--4_chkpt"
    out = world["root"] / "merged-offline"
    assert cli(["merge", str(ckpt4), "--base", str(world["ckpt"]), "--out", str(out)]) == 0
    assert "use unnorm_key='sft'" in capsys.readouterr().out
    assert safetensors_keys(out) == safetensors_keys(world["ckpt"])
    assert "sft" in json.loads((out / "config.json").read_text())["norm_stats"]


def _scramble(path: Path) -> None:
    path.write_bytes(b"\xff" * path.stat().st_size)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        # cut short: the patch's checkpoint.json names the file before anything loads
        (
            lambda d: (d / "align" / "projector.safetensors").write_bytes(b"\0" * 64),
            r"No complete checkpoint at .*: `align/projector.safetensors` has 64 bytes, \d+ when saved",
        ),
        # the same size, other bytes: the plugin's own check of the sidecar
        (lambda d: _scramble(d / "align" / "projector.safetensors"), "corrupt or truncated"),
        (lambda d: None, r"layers: saved \(16,\), now \(8,\)"),
    ],
    ids=["cut-sidecar", "corrupt-sidecar", "other-layers"],
)
def test_bad_resume_stops_before_training_and_keeps_the_checkpoint(world, adapter_run, tmp_path, corrupt, message):
    import re

    ckpt = tmp_path / "ckpt"
    shutil.copytree(adapter_run["cwd"] / "runs" / f"{adapter_run['exp']}--2_chkpt", ckpt)
    corrupt(ckpt)
    before = files(ckpt)
    layers = ("--align.layers", "[8]") if "layers" in message else ()
    proc, metrics = finetune(
        world, tmp_path / "run", *adapter_run["args"], *ALIGN, *layers, "--resume_from", str(ckpt), check=False
    )
    assert proc.returncode != 0 and re.search(message, proc.stderr), proc.stderr[-3000:]
    assert files(ckpt) == before and metrics == []  # nothing trained, the checkpoint untouched
    assert not written(tmp_path / "run")


@pytest.mark.parametrize(
    "args, message",
    [
        (("--align.enabeld", "true"), "enabeld"),
        (("--align.enabled", "true", "--align.layers", "[16,19]"), r"Layer\(s\) \[19\] out of range"),
        # the `datasets` plugin checks every run (plain SFT too), and says how to skip the check
        (("--dataset_name", "sft_v2"), r"neither a registered dataset.*--datasets\.check false skips this check"),
        ((*ALIGN, "--dataset_name", "sft_v2"), "neither a registered dataset"),
        (("--align.enabled", "true", "--align.teacher", "c-radio-v3-x"), "Known teachers: .*tiny-c-radio"),
    ],
    ids=["unknown-field", "layer-beyond-depth", "unknown-dataset-sft", "unknown-dataset-align", "unknown-teacher"],
)
def test_bad_input_fails_before_the_model_loads(world, tmp_path, args, message):
    import re

    proc, _ = finetune(world, tmp_path, "--max_steps", "2", *args, check=False)
    assert proc.returncode != 0 and re.search(message, proc.stderr), proc.stderr[-3000:]
    assert "trainable params" not in proc.stdout  # stopped before the model was loaded and wrapped
    assert not written(tmp_path)


def test_missing_teacher_weights_name_where_to_put_them(world, tmp_path):
    """The default teacher (C-RADIOv3-L) with no weights anywhere: the message names the file and the places."""
    proc, _ = finetune(world, tmp_path, "--max_steps", "2", "--align.enabled", "true", check=False)
    assert proc.returncode != 0 and "Teacher 'c-radio-v3-l' needs weights" in proc.stderr, proc.stderr[-3000:]
    assert "--align.teacher_path" in proc.stderr and "the HF cache" in proc.stderr
    assert "trainable params" not in proc.stdout and not written(tmp_path)


def test_help_lists_every_plugins_flags(world, tmp_path):
    proc, _ = finetune(world, tmp_path, "--help")
    assert "--align.teacher_path" in proc.stdout and "--merge_on_save" in proc.stdout
    assert "Weight of the alignment loss" in proc.stdout  # field help reaches draccus
    for flag in ("--freeze.vision", "--datasets.register_paper", "--datasets.check", "--norm_stats.fold"):
        assert flag in proc.stdout
    assert "The paper's Freeze baseline" in proc.stdout


def test_torchrun_two_ranks_from_a_yaml_recipe(world):
    """`torchrun --nproc-per-node 2` (gloo) with the align settings in a `--config_path` YAML: identical projectors
    are checked across ranks; rank 0 alone writes."""
    cwd = world["root"] / "torchrun"
    cwd.mkdir()
    recipe = cwd / "align.yaml"
    recipe.write_text(
        "max_steps: 2\nsave_steps: 2\nmerge_on_save: false\n"
        f"align:\n  enabled: true\n  teacher: tiny-c-radio\n  teacher_path: {world['teacher']}\n  coeff: 0.5\n"
        "  projector_dim: 64\n"
    )
    proc, metrics = finetune(world, cwd, "--config_path", str(recipe), nproc=2)
    (exp,) = [p.name for p in (cwd / "runs").iterdir()]
    ckpt = cwd / "runs" / exp
    assert {"adapter_model.safetensors", "trainer_state.pt", "align"} <= {p.name for p in ckpt.iterdir()}
    assert [m["step"] for m in metrics] == [0] and "align/loss" in metrics[0]
    assert json.loads((ckpt / "align" / "config.json").read_text())["coeff"] == 0.5
    assert metrics[0]["align/loss"] == pytest.approx(-0.5 * metrics[0]["align/cos_layer16"], abs=1e-3)
    assert proc.stdout.count("Saving Model Checkpoint for Step 2") == 1  # printed (and written) by rank 0 only


@pytest.fixture(scope="module")
def teacher_cache(world):
    """`openvla-align cache build --dataset sft` over the RLDS build, with the entry-point teacher."""
    out = world["root"] / "teacher-cache"
    env = _env(world)
    env["PYTHONPATH"] = os.pathsep.join([str(world["checkout"]), env["PYTHONPATH"]])
    cmd = [sys.executable, "-W", "ignore", "-c", "import sys; from openvla_align.cli import main; sys.exit(main())"]
    cmd += ["cache", "build", str(out), "--dataset", "sft", "--data-root", str(world["data"]), "--teacher"]
    cmd += ["tiny-c-radio", "--teacher-path", str(world["teacher"]), "--device", "cpu", "--shard-rows", "8"]
    proc = _proc.run(cmd, cwd=world["root"], env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "30 frames (30 computed now, 0 already there)" in proc.stdout
    return out


def test_training_reads_the_teacher_cache(world, teacher_cache):
    cwd = world["root"] / "cached"
    args = ("--max_steps", "2", "--save_steps", "2", "--merge_on_save", "false", "--image_aug", "false", *ALIGN)
    proc, metrics = finetune(world, cwd, *args, "--align.teacher_cache", str(teacher_cache))
    assert -1.0 <= metrics[0]["align/cos_layer16"] <= 1.0 and "align/loss" in metrics[0]
    (exp,) = [p.name for p in (cwd / "runs").iterdir()]
    sidecar = json.loads((cwd / "runs" / exp / "align" / "config.json").read_text())
    assert sidecar["teacher_cache"] == str(teacher_cache)


def test_teacher_cache_with_image_augmentation_is_refused_before_the_model_loads(world, teacher_cache, tmp_path):
    proc, _ = finetune(
        world, tmp_path, "--max_steps", "2", *ALIGN, "--align.teacher_cache", str(teacher_cache), check=False
    )  # image_aug defaults to true, as upstream
    assert proc.returncode != 0 and "colour jitter" in proc.stderr, proc.stderr[-3000:]
    assert "trainable params" not in proc.stdout and not written(tmp_path)


def test_a_trainable_projector_resumes_with_its_optimizer_state(world):
    """Spatial Forcing's trainable projector on OpenVLA's script: ``--resume_from`` restores its parameters (the
    sidecar) and its AdamW state (the script's ``trainer_state.pt``, which holds every parameter group)."""
    import torch

    cwd = world["root"] / "sf-adapters"
    sf = ("--align.projector", "spatial-forcing", "--align.freeze_projector", "false", "--align.loss",
          "one-minus-cosine", "--align.coeff", "0.5", "--align.pooling", "bilinear-corners")  # fmt: skip
    adapters_only = ("--merge_on_save", "false", "--save_latest_checkpoint_only", "false")
    args = ("--max_steps", "2", "--save_steps", "2", *adapters_only)
    proc, metrics = finetune(world, cwd, *args, *ALIGN, *sf)
    assert all(0 < m["align/loss"] <= 1.0 for m in metrics if "align/loss" in m)
    exp = min(p.name for p in (cwd / "runs").iterdir())
    ckpt2 = cwd / "runs" / f"{exp}--2_chkpt"
    state2 = torch.load(ckpt2 / "trainer_state.pt", map_location="cpu", weights_only=True)["optimizer"]
    projector_group = state2["param_groups"][-1]["params"]  # the plugin's parameters join as the last group
    (steps2,) = {state2["state"][i]["step"].item() for i in projector_group}  # gradient steps 0, 1 and 2
    assert steps2 == 3.0
    resumed = world["root"] / "sf-resumed"
    later = ("--max_steps", "4", "--save_steps", "2", *adapters_only)
    proc, _ = finetune(world, resumed, *later, *ALIGN, *sf, "--resume_from", str(ckpt2))
    assert "after gradient step 2" in proc.stdout
    ckpt4 = resumed / "runs" / f"{exp}--4_chkpt"
    state4 = torch.load(ckpt4 / "trainer_state.pt", map_location="cpu", weights_only=True)["optimizer"]
    steps4 = {state4["state"][i]["step"].item() for i in state4["param_groups"][-1]["params"]}
    assert steps4 == {steps2 + 2}  # steps 3 and 4 on top of the restored state (a fresh one would count 2)
    assert (ckpt4 / "align" / "projector.safetensors").read_bytes() != (
        ckpt2 / "align" / "projector.safetensors"
    ).read_bytes()  # restored, then trained on
