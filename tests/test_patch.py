"""patches/finetune.patch and `openvla-align patch`.

Always run: the patch files parse, the plugin helpers (the self-contained block between the patch's
``>>> finetune-plugins`` / ``<<< finetune-plugins`` markers, taken from the patch's added lines) discover entry points
of a throwaway distribution and extend a config that draccus parses from flags and YAML and shows in ``--help``.

With ``OPENVLA_SRC`` (an OpenVLA checkout; the upstream file is not vendored) also: check / patch / re-patch / revert
on a copy of it, refusal of edited or foreign files, and the patched script itself run on CPU under a shim (fake
prismatic, wandb and HF auto classes around a tiny model; the shim lives here, never in the patch): no plugin gives
the stock script's losses and files, a plugin's lifecycle and adapter-only checkpoints, and exact resume.
"""

import contextlib
import dataclasses
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Optional

import _cpu_shim
import pytest

from openvla_align.openvla import patch as P
from openvla_align.openvla.plugins import PLUGINS

PATCH_DIR = P.patch_dir()  # patches/ at the repository root (or inside the package)
TESTS_DIR = Path(__file__).resolve().parent
OPENVLA_SRC = os.environ.get("OPENVLA_SRC")
GROUP = "openvla.finetune_plugins"

needs_upstream = pytest.mark.skipif(
    not OPENVLA_SRC,
    reason="needs upstream finetune.py: set OPENVLA_SRC to a checkout of https://github.com/openvla/openvla "
    "(the revision named in patches/finetune.json)",
)


# --- the patch's own text ---------------------------------------------------------------------------------------


def added_text(patch_text: str) -> str:
    """Every line the patch adds, without the leading ``+``."""
    lines = P.split_lines(patch_text)
    return "".join(line[1:] for line in lines if line.startswith("+") and not line.startswith("+++"))


def plugin_block(source: str) -> str:
    """The self-contained helper block, through the two module-level lines that use it."""
    start = source.index("# >>> finetune-plugins")
    tail = source.index("FinetuneConfig = extend_config(FinetuneConfig, FINETUNE_PLUGINS)\n", start)
    return source[start : source.index("\n", tail) + 1]


def block_functions(source: str) -> str:
    return source[source.index("# >>> finetune-plugins") : source.index("# <<< finetune-plugins")]


def exec_block(os_module=os, host: str = "openvla") -> dict:
    """Run only the helper functions of a host's patch, with the imports the patched script gives them."""
    ns = {"__name__": "finetune_plugins_block", "dataclasses": dataclasses, "importlib": importlib}
    ns.update(os=os_module, shutil=shutil, Path=Path, json=json, Optional=Optional, contextlib=contextlib)
    exec(block_functions(added_text((P.patch_dir(host) / "finetune.patch").read_text())), ns)
    return ns


def test_patch_files_parse_and_agree():
    patch = P.load_patch(PATCH_DIR)
    assert patch.target == "vla-scripts/finetune.py"
    assert len(patch.upstream_sha256) == len(patch.patched_sha256) == 64
    assert len(patch.hunks) >= 5
    for hunk in patch.hunks:  # the header counts match the body (parse_unified_diff enforces it too)
        assert sum(t in " -" for t, _ in hunk.lines) == hunk.old_len
        assert sum(t in " +" for t, _ in hunk.lines) == hunk.new_len
    added = added_text(patch.source.read_text())
    assert "openvla_align" not in added and "import openvla" not in added  # generic: no plugin package imported
    assert P.patch_dir() == PATCH_DIR


def test_apply_hunks_exact_and_reversible():
    old = "a\nb\nc\nd\ne\nf\n"
    diff = textwrap.dedent(
        """\
        header text is ignored
        --- a/x.py
        +++ b/x.py
        @@ -1,3 +1,4 @@
         a
        +a2
         b
         c
        @@ -5,2 +6,2 @@
         e
        -f
        +F
        \\ No newline at end of file
        """
    )
    hunks = P.parse_unified_diff(diff)
    new = P.apply_hunks(old, hunks)
    assert new == "a\na2\nb\nc\nd\ne\nF"
    assert P.apply_hunks(new, [h.reversed() for h in hunks]) == old
    with pytest.raises(P.PatchError, match="hunk 2"):
        P.apply_hunks(old.replace("e\n", "E\n"), hunks)


# --- plugin discovery and config extension, for real (throwaway distributions on sys.path) ---------------------


def make_dist(root: Path, entry_points: dict, module_name: str, module_src: str, group: str = GROUP) -> Path:
    """A module and an installed-looking distribution (dist-info) declaring ``entry_points`` in ``group``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module_name}.py").write_text(textwrap.dedent(module_src))
    info = root / f"{module_name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module_name}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    return root


TOY_PLUGIN = """
    from dataclasses import dataclass
    from typing import Tuple


    @dataclass
    class ToyConfig:
        enabled: bool = False  # Toy switch
        layers: Tuple[int, ...] = (16,)  # Toy layers
        mode: str = "fast"  # Toy mode


    class ToyPlugin:
        name = "toy"
        config_cls = ToyConfig

        def __init__(self, config):
            self.config = config


    class SameNamePlugin:
        name = "toy"
        config_cls = ToyConfig


    class NoConfigPlugin:
        name = "noconf"


    class NotDataclassPlugin:
        name = "notdc"
        config_cls = dict


    class FieldNamePlugin:
        name = "vla_path"
        config_cls = ToyConfig
"""


@pytest.fixture
def block():
    return exec_block()


@pytest.fixture
def dist(tmp_path, monkeypatch):
    """Write a throwaway distribution under a test-only entry-point group; returns (group, module name)."""

    def make(entry_points):
        module = f"toyplug_{uuid.uuid4().hex[:8]}"
        group = f"openvla_align_tests.{module}"
        eps = {name: value.format(m=module) for name, value in entry_points.items()}
        monkeypatch.syspath_prepend(str(make_dist(tmp_path / "site", eps, module, TOY_PLUGIN, group)))
        return group, module

    return make


def test_discovery_loads_plugin_classes(block, dist):
    group, module = dist({"toy": "{m}:ToyPlugin", "toy-again": "{m}:ToyPlugin"})
    plugins = block["discover_finetune_plugins"](group)
    assert [(p.__module__, p.name) for p in plugins] == [(module, "toy")]  # one class behind two entry points
    assert block["discover_finetune_plugins"]("openvla_align_tests.nothing_here") == []


@pytest.mark.parametrize(
    "entry, error, match",
    [
        ({"x": "{m}:NoConfigPlugin"}, TypeError, "needs a `name` and a dataclass `config_cls`"),
        ({"x": "{m}:NotDataclassPlugin"}, TypeError, "is not a dataclass"),
        ({"a": "{m}:ToyPlugin", "b": "{m}:SameNamePlugin"}, ValueError, "both claim the name `toy`"),
        ({"broken": "{m}_missing:Plugin"}, RuntimeError, r"plugin `broken = .*_missing:Plugin` .* failed to load"),
    ],
)
def test_discovery_refuses_bad_plugins(block, dist, entry, error, match):
    group, _ = dist(entry)
    with pytest.raises(error, match=match):
        block["discover_finetune_plugins"](group)


@dataclasses.dataclass
class BaseConfig:
    vla_path: str = "openvla/openvla-7b"
    batch_size: int = 16


def test_extend_config(block, dist):
    extend = block["extend_config"]
    assert extend(BaseConfig, []) is BaseConfig  # no plugin: the stock class itself
    group, module = dist({"toy": "{m}:ToyPlugin", "clash": "{m}:FieldNamePlugin"})
    toy, clash = (getattr(importlib.import_module(module), name) for name in ("ToyPlugin", "FieldNamePlugin"))
    extended = extend(BaseConfig, [toy])
    assert issubclass(extended, BaseConfig)
    assert (extended.__name__, extended.__qualname__, extended.__module__) == (
        "BaseConfig",
        "BaseConfig",
        __name__,
    )
    cfg = extended(batch_size=2)
    assert cfg.batch_size == 2 and cfg.toy == toy.config_cls() and cfg.toy is not extended().toy
    with pytest.raises(ValueError, match="uses the name `vla_path` of an existing field"):
        extend(BaseConfig, [clash])


def test_commit_dir_replaces_and_survives_a_crash(tmp_path):
    block = exec_block()
    final = tmp_path / "run"
    staging = block["staging_dir"](final, create=True)
    assert staging == tmp_path / ".run.tmp" and staging.is_dir()
    (staging / "w").write_text("1")
    block["commit_dir"](staging, final)
    assert (final / "w").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    staging = block["staging_dir"](final)  # a path only (other ranks); create=True empties leftovers
    staging.mkdir()
    (staging / "stale").write_text("x")
    staging = block["staging_dir"](final, create=True)
    assert list(staging.iterdir()) == []
    (staging / "w").write_text("2")
    block["commit_dir"](staging, final)
    assert (final / "w").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    class CrashingOs:  # the process dies right after moving the previous checkpoint aside
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt("killed")
            os.replace(src, dst)

    crashing = exec_block(os_module=CrashingOs())
    staging = crashing["staging_dir"](final, create=True)
    (staging / "w").write_text("3")
    with pytest.raises(KeyboardInterrupt):
        crashing["commit_dir"](staging, final)
    assert (tmp_path / ".run.old" / "w").read_text() == "2"  # previous checkpoint intact
    assert (tmp_path / ".run.tmp" / "w").read_text() == "3"  # complete new one, not yet renamed


def _checkpoint(block, directory: Path, step: int, complete: bool = True) -> Path:
    """A resumable checkpoint as the patched script writes it (adapter, trainer state, align sidecar, marker last)."""
    staging = block["staging_dir"](directory, create=True)
    (staging / "adapter_model.safetensors").write_bytes(bytes(64 + step))
    (staging / "trainer_state.pt").write_bytes(bytes(8))
    (staging / "align").mkdir()
    (staging / "align" / "projector.safetensors").write_bytes(bytes(16))
    if complete:
        block["mark_complete"](staging, step)
    block["commit_dir"](staging, directory)
    return directory


def test_a_checkpoint_is_complete_only_with_its_marker_and_every_file_whole(tmp_path):
    block = exec_block()
    ckpt = _checkpoint(block, tmp_path / "run", 4)
    assert block["checkpoint_step"](ckpt) == 4
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    assert set(marker["files"]) == {"adapter_model.safetensors", "trainer_state.pt", "align/projector.safetensors"}
    (ckpt / "align" / "projector.safetensors").write_bytes(bytes(8))  # the sidecar cut short
    assert block["checkpoint_step"](ckpt) is None
    assert block["checkpoint_step"](_checkpoint(block, tmp_path / "unmarked", 2, complete=False)) is None
    assert block["checkpoint_step"](tmp_path / "missing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.json").write_text("{")  # a marker cut short
    assert block["checkpoint_step"](tmp_path / "bad") is None


def test_resume_finds_the_complete_checkpoint_a_crash_left(tmp_path, capsys):
    block = exec_block()
    resolve = block["resolve_resume"]
    run, adapters = tmp_path / "runs" / "exp", tmp_path / "adapters" / "exp"
    _checkpoint(block, run, 2)
    assert resolve(run, run, adapters) == run and capsys.readouterr().out == ""
    # killed between the two renames of step 4's save: only `.exp.old` (step 2) is left, and a complete `.exp.tmp`
    run.rename(tmp_path / "runs" / ".exp.old")
    staging = block["staging_dir"](run, create=True)
    (staging / "trainer_state.pt").write_bytes(bytes(8))
    block["mark_complete"](staging, 4)
    assert resolve(run, run, adapters, is_main_process=False) == run  # another rank: where the main one puts it
    assert staging.is_dir() and not run.exists() and capsys.readouterr().out == ""
    assert resolve(run, run, adapters) == run and block["checkpoint_step"](run) == 4  # the newest, moved into place
    out = capsys.readouterr().out.strip()
    assert out == f"A save was interrupted: `{staging}` (step 4) is the newest complete checkpoint, now `{run}`"
    assert block["checkpoint_step"](tmp_path / "runs" / ".exp.old") == 2  # kept: the next save removes it
    # only `.exp.old` left (nothing newer): it is moved into place the same way
    shutil.rmtree(run)
    run.mkdir()  # the run directory the script makes (and locks) before it resolves: empty, replaced
    assert resolve(Path("latest"), run, adapters) == run and block["checkpoint_step"](run) == 2
    capsys.readouterr()
    # `<run>` in the way, cut short, with a complete `.old` beside it: one line says what to move
    old = block["staging_dir"](run, create=True).rename(tmp_path / "runs" / ".exp.old")
    (old / "trainer_state.pt").write_bytes(bytes(8))
    block["mark_complete"](old, 2)
    (run / "trainer_state.pt").write_bytes(b"cut")
    with pytest.raises(SystemExit) as stop:
        resolve(run, run, adapters)
    assert "\n" not in str(stop.value) and f"move `{run}` aside and `{old}` to `{run}`" in str(stop.value)
    shutil.rmtree(old)
    _checkpoint(block, run, 4)
    # `latest` among several checkpoints of the run (and none of another run's)
    _checkpoint(block, tmp_path / "runs" / "exp--6_chkpt", 6)
    _checkpoint(block, tmp_path / "runs" / "other--9_chkpt", 9)
    _checkpoint(block, tmp_path / "runs" / "exp--8_chkpt", 8, complete=False)  # killed before its marker
    assert resolve(Path("latest"), run, adapters) == tmp_path / "runs" / "exp--6_chkpt"
    ten = block["staging_dir"](tmp_path / "runs" / "exp--10_chkpt", create=True)  # complete, killed before its rename
    (ten / "trainer_state.pt").write_bytes(bytes(8))
    block["mark_complete"](ten, 10)
    assert resolve(Path("latest"), run, adapters) == tmp_path / "runs" / "exp--10_chkpt" and not ten.exists()
    # a checkpoint of an earlier openvla-align (no marker, trainer state present) is taken as it is
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "trainer_state.pt").write_bytes(b"x")
    assert resolve(legacy, run, adapters) == legacy
    with pytest.raises(SystemExit) as stop:
        resolve(tmp_path / "nothing", run, adapters)
    assert "\n" not in str(stop.value) and "No complete checkpoint at" in str(stop.value)


def test_a_save_failing_on_a_full_disk_keeps_the_previous_checkpoint_and_stops_in_one_line(tmp_path):
    import errno

    block = exec_block()
    final = _checkpoint(block, tmp_path / "run", 2)
    before = {p.name: p.read_bytes() for p in final.rglob("*") if p.is_file()}
    staging = block["staging_dir"](final, create=True)
    with pytest.raises(SystemExit) as stop, block["save_or_stop"](staging, final, 4):
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(stop.value)
    assert "\n" not in message and "Saving step 4 failed (No space left on device)" in message
    assert f"--resume_from {final}" in message
    assert not staging.exists() and {p.name: p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    assert block["checkpoint_step"](final) == 2


def test_a_second_writer_of_the_run_directory_is_refused(tmp_path):
    block = exec_block()
    held = block["lock_run_dir"](tmp_path)
    code = (
        "import sys, json, os, shutil, contextlib, dataclasses, importlib\nfrom pathlib import Path\n"
        "from typing import Optional\n"
        f"exec(open({str(tmp_path / 'block.py')!r}).read())\nlock_run_dir(Path({str(tmp_path)!r}))\n"
        "print('LOCKED')\n"
    )
    (tmp_path / "block.py").write_text(block_functions(added_text((PATCH_DIR / "finetune.patch").read_text())))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "LOCKED" not in proc.stdout
    assert "is being written by another fine-tuning process" in proc.stderr and not list(tmp_path.glob(".*"))
    os.close(held)  # the first process ends: the directory is free again
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "LOCKED" in proc.stdout


def test_the_run_lock_moves_to_the_directory_a_save_renames_into_its_place(tmp_path):
    """A save of the run directory itself (one checkpoint kept) replaces it by a new directory: the lock taken on
    the old one moves to the new one, so a second writer is still refused after the save."""
    block = exec_block()
    run = tmp_path / "run"
    run.mkdir()
    held = block["lock_run_dir"](run)
    assert block["lock_run_dir"](run, held=held) == held  # the same directory: the lock it has
    staging = block["staging_dir"](run, create=True)
    block["commit_dir"](staging, run)
    held = block["lock_run_dir"](run, held=held)
    (tmp_path / "block.py").write_text(block_functions(added_text((PATCH_DIR / "finetune.patch").read_text())))
    code = (
        "import sys, json, os, shutil, contextlib, dataclasses, importlib\nfrom pathlib import Path\n"
        "from typing import Optional\n"
        f"exec(open({str(tmp_path / 'block.py')!r}).read())\nlock_run_dir(Path({str(run)!r}))\nprint('LOCKED')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "is being written by another fine-tuning process" in proc.stderr
    os.close(held)


SHARED_HELPERS = (
    "staging_dir",
    "commit_dir",
    "checkpoint_check",
    "checkpoint_step",
    "lock_run_dir",
    "visible_name",
    "move_into_place",
)
HOSTS = ("openvla", "openvla-oft")


def test_both_hosts_patches_share_the_checkpoint_helpers_verbatim():
    blocks = [block_functions(added_text((P.patch_dir(h) / "finetune.patch").read_text())) for h in HOSTS]
    for name in SHARED_HELPERS:
        sources = {block[block.index(f"def {name}(") :].split("\n\n\n")[0] for block in blocks}
        assert len(sources) == 1, f"`{name}` differs between the OpenVLA and OpenVLA-OFT patches"


def _oft_checkpoint(block, directory: Path, step: int, merged: bool = True, complete: bool = True) -> Path:
    """An OFT checkpoint as the patched script writes it (adapter, merged model, sidecar, marker last)."""
    staging = block["staging_dir"](directory, create=True)
    (staging / "lora_adapter").mkdir()
    (staging / "lora_adapter" / "adapter_model.safetensors").write_bytes(bytes(64 + step))
    (staging / "align").mkdir()
    (staging / "align" / "projector.safetensors").write_bytes(bytes(16))
    if merged:
        (staging / "model.safetensors").write_bytes(bytes(128))
        (staging / "config.json").write_text("{}")
    if complete:
        block["mark_complete"](staging, step)
    return staging


def test_ofts_resume_takes_a_complete_checkpoint_at_its_step_or_the_runs_newest(tmp_path, capsys):
    """`--resume true` on OFT's script: with `--resume_step`, `vla_path` must be complete at that step; without it,
    the newest complete merged checkpoint of the run; a complete `.X.tmp` (killed between the renames) is renamed
    into place first, on the main process only. Files OFT rewrites when resuming (config.json) are not checked."""
    block = exec_block(host="openvla-oft")
    resolve, commit = block["resolve_resume"], block["commit_dir"]
    run = tmp_path / "exp"
    run.mkdir()  # OFT's run directory: dataset statistics only, never a checkpoint in this mode
    two, four = run.parent / "exp--2_chkpt", run.parent / "exp--4_chkpt"
    commit(_oft_checkpoint(block, two, 2), two)
    commit(_oft_checkpoint(block, four, 4, merged=False), four)  # `--merge_lora_during_training false`: OFT can't
    _oft_checkpoint(block, run.parent / "exp--6_chkpt", 6, complete=False)  # killed inside step 6's save
    assert resolve(str(two), 2, True) == (str(two), 2) and capsys.readouterr().out == ""
    (two / "config.json").write_text('{"auto_map": {}}')  # OFT's update_auto_map on resume: still complete
    assert resolve(str(run), None, True) == (str(two), 2)
    assert capsys.readouterr().out == f"Resuming from `{two}`, step 2, the newest complete checkpoint of the run\n"
    wrong_step = rf"No complete checkpoint `{two}` at step 3 .*\(it holds step 2\).*newest complete one is `{two}`"
    with pytest.raises(SystemExit, match=wrong_step):
        resolve(str(two), 3, True)
    unmerged = r"at step 4 holding a merged model \(saved with `--merge_lora_during_training false`.*newest complete"
    with pytest.raises(SystemExit, match=unmerged):
        resolve(str(four), 4, True)

    eight = run.parent / "exp--8_chkpt"
    _oft_checkpoint(block, eight, 8)  # complete, killed before its rename
    assert resolve(str(run), None, False) == (str(eight), 8)  # another rank: the path it will be at
    assert (run.parent / ".exp--8_chkpt.tmp").is_dir() and capsys.readouterr().out == ""
    assert resolve(str(run), None, True) == (str(eight), 8) and (eight / "checkpoint.json").is_file()
    out = capsys.readouterr().out
    assert (
        out == f"A save was interrupted: `{run.parent / '.exp--8_chkpt.tmp'}` (step 8) is the newest complete "
        f"checkpoint, now `{eight}`\n"
    )

    legacy = tmp_path / "stock--1_chkpt"  # written by the stock script or an older patch: taken as it is
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    assert resolve(str(legacy), 1, True) == (str(legacy), 1)
    for path, step in [(tmp_path / "nothing", None), (run, 5)]:
        with pytest.raises(SystemExit) as stop:
            resolve(str(path), step, True)
        assert "\n" not in str(stop.value) and str(stop.value).startswith("No complete checkpoint")


# --- draccus: flags, YAML and --help of the extended config (subprocess: the script is __main__) ------------------

STAND_IN_CONFIG = """
@dataclass
class FinetuneConfig:
    vla_path: str = "openvla/openvla-7b"            # Path to the model
    run_root_dir: Path = Path("runs")                # Where runs go
    merge_on_save: bool = True                       # If False, save LoRA adapters only (no merging)
    resume_from: Optional[Path] = None               # Resume LoRA, optimizer & step from a checkpoint
"""


def upstream_config_source(patched: str) -> str:
    """``FinetuneConfig`` (with its decorator) as the patched script defines it."""
    start = patched.index("@dataclass\nclass FinetuneConfig:")
    return patched[start : patched.index("    # fmt: on\n", start) + len("    # fmt: on\n")]


def write_stub(path: Path, config_source: str, block_source: str) -> Path:
    path.write_text(
        "import contextlib\nimport dataclasses\nimport importlib.metadata\nimport json\nimport os\nimport shutil\n"
        "from dataclasses import dataclass\nfrom pathlib import Path\nfrom typing import Optional\n\nimport draccus\n\n"
        f"{config_source}\n\n{block_source}\n\n"
        "@draccus.wrap()\ndef finetune(cfg: FinetuneConfig) -> None:\n"
        '    print("CONFIG=" + json.dumps(dataclasses.asdict(cfg), default=str))\n\n\n'
        'if __name__ == "__main__":\n    finetune()\n'
    )
    return path


def config_sources():
    sources = [pytest.param(STAND_IN_CONFIG, id="stand-in-config")]
    if OPENVLA_SRC:
        patch = P.load_patch(PATCH_DIR)
        upstream = (Path(OPENVLA_SRC) / patch.target).read_text()
        patched = P.apply_hunks(upstream, patch.hunks)
        sources.append(pytest.param(upstream_config_source(patched), id="upstream-config"))
    return sources


@pytest.mark.parametrize("config_source", config_sources())
def test_draccus_parses_plugin_fields(tmp_path, config_source):
    module = f"toyplug_{uuid.uuid4().hex[:8]}"
    site = make_dist(
        tmp_path / "site",
        {"toy": f"{module}:ToyPlugin", **{cls.name: f"{cls.__module__}:{cls.__name__}" for cls in PLUGINS}},
        module,
        TOY_PLUGIN,
    )
    block = plugin_block(added_text((PATCH_DIR / "finetune.patch").read_text()))
    stub = write_stub(tmp_path / "finetune_stub.py", config_source, block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}

    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-W", "ignore", str(stub), *args], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    def parsed(*args):
        line = next(x for x in run(*args).splitlines() if x.startswith("CONFIG="))
        return json.loads(line[len("CONFIG=") :])

    cfg = parsed(
        "--align.enabled", "true", "--align.layers", "[8,16]", "--toy.mode", "slow", "--merge_on_save", "false"
    )
    assert cfg["align"]["enabled"] is True and cfg["align"]["layers"] == [8, 16]
    assert cfg["toy"] == {"enabled": False, "layers": [16], "mode": "slow"}
    assert cfg["merge_on_save"] is False and cfg["resume_from"] is None
    defaults = parsed()  # stock defaults when no plugin flag is given
    assert defaults["align"]["enabled"] is False and defaults["freeze"] == {"vision": False}
    assert defaults["datasets"] == {"register_paper": True, "check": True} and defaults["norm_stats"] == {"fold": True}
    cfg = parsed("--freeze.vision", "true", "--datasets.check", "false", "--norm_stats.fold", "false")
    assert cfg["freeze"]["vision"] is True and cfg["datasets"]["check"] is False and cfg["norm_stats"]["fold"] is False
    assert parsed("--align.freeze_vision", "true")["align"]["freeze_vision"] is True  # the old spelling still parses

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_on_save: false\nresume_from: runs/ckpt\nalign:\n  enabled: true\n  layers: [8, 16]\n  coeff: 0.5\n"
        "toy:\n  layers: [1, 2]\n"
    )
    cfg = parsed("--config_path", str(recipe), "--align.coeff", "0.3")
    assert cfg["align"]["enabled"] is True and cfg["align"]["layers"] == [8, 16] and cfg["align"]["coeff"] == 0.3
    assert cfg["toy"]["layers"] == [1, 2] and cfg["merge_on_save"] is False and cfg["resume_from"] == "runs/ckpt"

    help_text = run("--help")
    flags = ("--align.enabled", "--align.layers", "--align.teacher", "--toy.mode", "--merge_on_save", "--freeze.vision")
    for flag in flags + ("--datasets.register_paper", "--datasets.check", "--norm_stats.fold"):
        assert flag in help_text
    assert "Toy mode" in help_text  # the plugin's field comments
    assert "If False, save LoRA adapters only" in help_text  # the script's own comments survive the extension


# --- `openvla-align patch` on a copy of upstream (OPENVLA_SRC) --------------------------------------------------


@pytest.fixture
def checkout(tmp_path):
    dst = tmp_path / "openvla"
    shutil.copytree(OPENVLA_SRC, dst, ignore=shutil.ignore_patterns(".git"))
    return dst


def cli(capsys, *args):
    from openvla_align.cli import main

    code = main(["patch", *args])
    return code, capsys.readouterr()


@needs_upstream
def test_check_patch_repatch_revert(checkout, capsys):
    target = checkout / "vla-scripts" / "finetune.py"
    original = target.read_bytes()
    mode = target.stat().st_mode

    code, out = cli(capsys, "--check", str(checkout))
    assert code == 0 and out.out.startswith("unpatched:")

    code, out = cli(capsys, str(checkout))
    assert code == 0 and out.out.startswith("patched:") and "applied 10 hunks" in out.out
    patched = target.read_text()
    compile(patched, str(target), "exec")  # parses
    assert (checkout / "vla-scripts" / "finetune.py.orig").read_bytes() == original
    assert target.stat().st_mode == mode
    assert plugin_block(patched) == plugin_block(added_text((PATCH_DIR / "finetune.patch").read_text()))
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []  # no temp files left

    code, out = cli(capsys, str(target))  # the file itself works as PATH too
    assert code == 0 and out.out.startswith("already patched:") and target.read_text() == patched

    code, out = cli(capsys, "--check", str(checkout))
    assert code == 0 and out.out.startswith("patched:")

    code, out = cli(capsys, "--revert", str(checkout))
    assert code == 0 and out.out.startswith("reverted:")
    assert target.read_bytes() == original and not (checkout / "vla-scripts" / "finetune.py.orig").exists()

    code, out = cli(capsys, "--revert", str(checkout))
    assert code == 0 and out.out.startswith("not patched")


@needs_upstream
def test_revert_without_backup_reverses_hunks(checkout, capsys):
    target = checkout / "vla-scripts" / "finetune.py"
    original = target.read_bytes()
    assert cli(capsys, str(checkout))[0] == 0
    (checkout / "vla-scripts" / "finetune.py.orig").unlink()
    code, out = cli(capsys, "--revert", str(checkout))
    assert code == 0 and "from reversed hunks" in out.out and target.read_bytes() == original


def test_a_script_it_does_not_know_is_refused_in_one_line_on_stderr(tmp_path, capsys):
    """Runs without the upstream snapshots: any finetune.py that is none of the known revisions."""
    target = tmp_path / "vla-scripts" / "finetune.py"
    target.parent.mkdir()
    target.write_text("print('a fork of finetune.py')\n")
    for args in ((str(tmp_path),), ("--revert", str(tmp_path))):
        code, out = cli(capsys, *args)
        assert code == 1 and not out.out and len(out.err.splitlines()) == 1, out
        assert out.err.startswith("openvla-align patch: unknown: ") and "restore the upstream file" in out.err
    assert target.read_text() == "print('a fork of finetune.py')\n" and sorted(target.parent.iterdir()) == [target]


@needs_upstream
def test_refuses_edited_and_foreign_files(checkout, capsys):
    target = checkout / "vla-scripts" / "finetune.py"
    edited = target.read_bytes().replace(b"batch_size: int = 16", b"batch_size: int = 8")
    target.write_bytes(edited)
    for args in ((str(checkout),), ("--revert", str(checkout))):  # refusals: one line on stderr, nothing on stdout
        code, out = cli(capsys, *args)
        assert code == 1 and out.err.startswith("openvla-align patch: unknown:") and not out.out
        assert len(out.err.splitlines()) == 1 and target.read_bytes() == edited
    code, out = cli(capsys, "--check", str(checkout))  # a report, on stdout: one line too
    assert code == 1 and out.out.startswith("unknown:") and len(out.out.splitlines()) == 1 and not out.err
    assert not (checkout / "vla-scripts" / "finetune.py.orig").exists()

    foreign = checkout / "vla-scripts" / "train.py"
    before = foreign.read_bytes()
    code, out = cli(capsys, str(foreign))
    assert code == 1 and "unknown:" in out.err and out.err.strip().endswith("Nothing was changed.")
    assert len(out.err.splitlines()) == 1 and foreign.read_bytes() == before

    code, out = cli(capsys, str(checkout / "prismatic"))
    assert code == 1 and "is not a checkout of OpenVLA" in out.err


@needs_upstream
def test_refuses_to_overwrite_a_backup_that_is_not_the_upstream_file(checkout, capsys):
    target, backup = checkout / "vla-scripts" / "finetune.py", checkout / "vla-scripts" / "finetune.py.orig"
    original = target.read_bytes()
    backup.write_text("someone's own copy\n")
    code, out = cli(capsys, str(checkout))
    assert code == 1 and not out.out and len(out.err.splitlines()) == 1
    assert out.err.startswith(f"openvla-align patch: refused: {backup} exists and is not the upstream file")
    assert target.read_bytes() == original and backup.read_text() == "someone's own copy\n"


@needs_upstream
def test_refuses_to_revert_an_edited_patched_file(checkout, capsys):
    target = checkout / "vla-scripts" / "finetune.py"
    assert cli(capsys, str(checkout))[0] == 0
    edited = target.read_bytes() + b"# local edit\n"
    target.write_bytes(edited)
    code, out = cli(capsys, "--revert", str(checkout))
    assert code == 1 and "The original upstream file is kept in" in out.err and target.read_bytes() == edited
    assert len(out.err.splitlines()) == 1


# --- the patched script on CPU under a shim ----------------------------------------------------------------------


class ProbePlugin:
    """A test plugin: one trainable scalar scales a loss term; every call is recorded in ``config.log``."""

    @dataclasses.dataclass
    class Config:  # evaluated annotations: draccus 0.8 cannot parse string ones (`from __future__ import annotations`)
        enabled: bool = False  # add the probe's loss term
        coeff: float = 0.1  # weight of the term
        log: str = "probe_calls.json"  # where calls are recorded

    name = "probe"
    config_cls = Config

    def __init__(self, config):
        self.config, self.calls, self.scale = config, [], None

    def _record(self, *args):
        self.calls.append(list(args))
        Path(self.config.log).write_text(json.dumps(self.calls))

    def setup(self, cfg, is_main_process):
        self._record("setup", is_main_process)

    def on_model_ready(self, vla, cfg):
        import torch

        self._record("on_model_ready", type(vla).__name__)
        if not self.config.enabled:
            return []
        self.scale = torch.nn.Parameter(torch.ones(()))
        return [self.scale]

    def loss(self, vla, batch, output, step):
        if not self.config.enabled:
            self._record("loss", step, output.loss.item(), None)
            return None, {}
        term = self.config.coeff * self.scale * output.logits.float().pow(2).mean()
        self._record("loss", step, output.loss.item(), term.item(), self.scale.item())
        return term, {"probe/term": term.detach(), "probe/scale": self.scale.detach()}

    def on_save(self, save_dir, is_main_process):
        import torch

        save_dir = Path(save_dir)  # other ranks get the path only: the main process writes the checkpoint
        self._record("on_save", save_dir.name, sorted(p.name for p in save_dir.iterdir()) if is_main_process else None)
        if is_main_process and self.config.enabled:
            torch.save({"scale": self.scale.detach()}, save_dir / "probe.pt")

    def on_resume(self, save_dir):
        import torch

        self._record("on_resume", str(save_dir))
        if self.config.enabled:
            self.scale.data.copy_(torch.load(Path(save_dir) / "probe.pt", weights_only=True)["scale"])

    def on_end(self):
        self._record("on_end")


def _shim_main() -> None:
    """Run finetune.py (stock or patched) on CPU: argv[1] is a JSON spec (script, argv, base, wandb_log, plugins)."""
    import runpy
    import types

    import numpy as np
    import torch
    import torch.nn.parallel
    from transformers import PreTrainedTokenizerFast

    from openvla_align.tiny.model import TinyOpenVLA

    spec = json.loads(sys.argv[1])
    script, base = str(Path(spec["script"]).resolve()), Path(spec["base"])
    log = []

    def record(kind, **data):
        log.append({"kind": kind, **data})
        Path(spec["wandb_log"]).write_text(json.dumps(log))

    # CUDA-only calls => CPU in one gloo group (the same stand-ins the real-stack test uses)
    rank = spec.get("rank", 0)
    store = spec.get("store", Path(spec["wandb_log"]).with_suffix(".pg"))
    _cpu_shim.install(script, rank, spec.get("world_size", 1), store)

    # HF auto classes: the tiny checkpoint in `base`
    class Processor:
        def __init__(self):
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
            self.image_processor = types.SimpleNamespace(apply_transform=None)

        def save_pretrained(self, directory):
            self.tokenizer.save_pretrained(directory)

    class Auto:
        register = staticmethod(lambda *a, **k: None)

    class AutoProcessor(Auto):
        from_pretrained = staticmethod(lambda *a, **k: Processor())

    class AutoModel(Auto):
        @staticmethod
        def from_pretrained(path, torch_dtype=None, **kwargs):
            model = TinyOpenVLA.from_pretrained(path, torch_dtype=torch_dtype)
            model.config.image_sizes = [model.config.image_size] * 2
            return model

    # prismatic & wandb
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod

    class ActionTokenizer:
        def __init__(self, tokenizer):
            self.vocab_size = len(tokenizer)
            self.action_token_begin_idx = self.vocab_size - 257

        def decode_token_ids_to_actions(self, ids):
            return (self.vocab_size - np.asarray(ids)) / 256.0

    class Dataset(torch.utils.data.IterableDataset):
        """The same 4 examples forever (batches of 2 alternate), like a restarted RLDS stream at even steps;
        with ``rank_data`` every rank draws its own 4."""

        def __init__(self, data_root_dir, dataset_name, batch_transform, resize_resolution, **kwargs):
            self.size = resize_resolution[0]
            self.vocab = len(batch_transform.tokenizer)
            self.dataset_statistics = {"toy": {"action": {"q01": np.zeros(7)}, "num_transitions": np.array(4)}}

        def __iter__(self):
            gen = torch.Generator().manual_seed(rank if spec.get("rank_data") else 0)
            items = []
            for _ in range(4):
                ids = torch.randint(4, 400, (14,), generator=gen)
                ids[0] = 1
                ids[-7:] = self.vocab - 1 - torch.randint(0, 256, (7,), generator=gen)
                labels = torch.where(torch.arange(14) < 7, torch.full_like(ids, -100), ids)
                pixels = torch.randn(6, self.size, self.size, generator=gen)
                items.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
            while True:
                yield from items

    def collate(examples):
        batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        return batch

    def save_dataset_statistics(stats, directory):
        for s in stats.values():
            s["action"] = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in s["action"].items()}
            s["num_transitions"] = int(s["num_transitions"])
        (Path(directory) / "dataset_statistics.json").write_text(json.dumps(stats))

    module("prismatic")
    module("prismatic.models.backbones.llm.prompting", PurePromptBuilder=object, VicunaV15ChatPromptBuilder=object)
    module("prismatic.util.data_utils", PaddedCollatorForActionPrediction=lambda *a, **k: collate)
    module("prismatic.vla.action_tokenizer", ActionTokenizer=ActionTokenizer)
    transform = types.SimpleNamespace
    module(
        "prismatic.vla.datasets", RLDSBatchTransform=lambda a, tok, **k: transform(tokenizer=tok), RLDSDataset=Dataset
    )
    module("prismatic.vla.datasets.rlds.utils.data_utils", save_dataset_statistics=save_dataset_statistics)
    module("prismatic.extern.hf.configuration_prismatic", OpenVLAConfig=object)
    module("prismatic.extern.hf.modeling_prismatic", OpenVLAForActionPrediction=object)
    module("prismatic.extern.hf.processing_prismatic", PrismaticImageProcessor=object, PrismaticProcessor=object)
    module("wandb", init=lambda **k: record("init", **k), log=lambda d, step: record("log", step=step, **d))

    # exactly the plugins the spec names are installed
    eps = importlib.metadata.EntryPoints(importlib.metadata.EntryPoint(n, v, GROUP) for n, v in spec["plugins"])
    importlib.metadata.entry_points = lambda **kwargs: eps.select(**kwargs) if kwargs else eps

    hf = sys.modules["transformers"]  # set late: importing transformers' submodules may replace the module object
    autos = {"AutoProcessor": AutoProcessor, "AutoModelForVision2Seq": AutoModel, "AutoConfig": Auto}
    for name, value in {**autos, "AutoImageProcessor": Auto}.items():
        setattr(hf, name, value)
    torch.manual_seed(0)
    sys.argv = [script, *spec["argv"]]
    runpy.run_path(script, run_name="__main__")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from openvla_align.tiny import build_tiny_vla, build_tokenizer

    base = tmp_path_factory.mktemp("tiny_base")
    tokenizer = build_tokenizer()
    build_tiny_vla(seed=0, vocab_size=len(tokenizer), image_size=56).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    if not OPENVLA_SRC:
        pytest.skip("needs OPENVLA_SRC")
    stock = Path(OPENVLA_SRC) / "vla-scripts" / "finetune.py"
    patch = P.load_patch(PATCH_DIR)
    (root / "stock.py").write_bytes(stock.read_bytes())
    (root / "patched.py").write_text(P.apply_hunks(stock.read_text(), patch.hunks))
    return root


def shim_command(script: Path, base: Path, args, plugins=(), **spec) -> list:
    spec.update(script=str(script), base=str(base), plugins=[list(p) for p in plugins])
    spec.setdefault("wandb_log", "wandb.json")
    spec["argv"] = ["--vla_path", str(base), "--batch_size", "2", "--run_root_dir", "runs", "--adapter_tmp_dir"]
    spec["argv"] += ["adapters", *args]
    code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_patch; test_patch._shim_main()"
    return [sys.executable, "-W", "ignore", "-c", code, json.dumps(spec)]


SHIM_ENV = {"PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def run_script(script: Path, cwd: Path, base: Path, *args, plugins=()):
    """Run a finetune.py under the shim in ``cwd``; returns (wandb log records, probe calls or None)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SHIM_ENV}
    proc = subprocess.run(shim_command(script, base, args, plugins), cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    calls = cwd / "probe_calls.json"
    return json.loads((cwd / "wandb.json").read_text()), json.loads(calls.read_text()) if calls.exists() else None


PROBE = [("probe", "test_patch:ProbePlugin")]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_upstream
@pytest.mark.parametrize("plugins", [(), PROBE], ids=["no-plugin", "plugin-disabled"])
def test_patched_script_matches_stock(tmp_path, scripts, tiny_base, plugins):
    args = ("--max_steps", "4", "--save_steps", "2")
    stock_log, _ = run_script(scripts / "stock.py", tmp_path / "stock", tiny_base, *args)
    patched_log, calls = run_script(scripts / "patched.py", tmp_path / "patched", tiny_base, *args, plugins=plugins)
    assert patched_log == stock_log and stock_log[1]["kind"] == "log"  # same losses and metrics
    assert (calls is None) == (not plugins)
    for d in ("runs", "adapters"):  # same files, byte for byte
        assert tree(tmp_path / "patched" / d) == tree(tmp_path / "stock" / d)
    assert f"{tiny_base.name}+droid_wipe" in next(iter(tree(tmp_path / "stock" / "runs")))


@needs_upstream
def test_plugin_lifecycle_and_default_layout(tmp_path, scripts, tiny_base):
    run = tmp_path / "run"
    args = ("--max_steps", "4", "--save_steps", "2", "--probe.enabled", "true")
    log, calls = run_script(scripts / "patched.py", run, tiny_base, *args, plugins=PROBE)
    exp = next((run / "runs").iterdir()).name
    order = "setup on_model_ready loss loss loss on_save loss loss on_save on_end"
    assert " ".join(c[0] for c in calls) == order
    assert calls[1] == ["on_model_ready", "PeftModel"] and [c[1] for c in calls if c[0] == "loss"] == [0, 1, 2, 3, 4]
    assert calls[5][1] == f".{exp}.tmp" and "trainer_state.pt" not in calls[5][2]  # stock mode: no optimizer state
    step0 = next(r for r in log if r["kind"] == "log")
    assert step0["train_loss"] == pytest.approx(calls[2][2] + calls[2][3], rel=1e-5)  # the term joins the loss
    assert step0["probe/term"] == pytest.approx(calls[2][3]) and step0["probe/scale"] == 1.0
    adapter = sorted(p.name for p in (run / "adapters" / exp).iterdir())
    assert adapter == ["README.md", "adapter_config.json", "adapter_model.safetensors", "probe.pt"]
    merged = sorted(p.name for p in (run / "runs" / exp).iterdir())
    assert "model.safetensors" in merged and "dataset_statistics.json" in merged and "probe.pt" not in merged
    for root in (run / "runs", run / "adapters"):  # no staging or previous-checkpoint directories left behind
        assert [p.name for p in root.iterdir()] == [exp]


@needs_upstream
def test_adapter_only_checkpoints_resume_exactly(tmp_path, scripts, tiny_base):
    import torch

    args = ("--max_steps", "6", "--save_steps", "3", "--merge_on_save", "false", "--save_latest_checkpoint_only")
    args += ("false", "--probe.enabled", "true")
    _, full = run_script(scripts / "patched.py", tmp_path / "full", tiny_base, *args, plugins=PROBE)
    runs = tmp_path / "full" / "runs"
    exp = sorted(p.name for p in runs.iterdir())[0]
    assert sorted(p.name for p in runs.iterdir()) == [exp, f"{exp}--3_chkpt", f"{exp}--6_chkpt"]
    assert not (tmp_path / "full" / "adapters").exists()  # no merge anywhere
    ckpt3 = runs / f"{exp}--3_chkpt"
    files = {p.name for p in ckpt3.iterdir()}  # adapter, processor (tokenizer files), statistics, state, sidecar
    expected = {"adapter_config.json", "adapter_model.safetensors", "dataset_statistics.json", "tokenizer_config.json"}
    assert expected | {"trainer_state.pt", "probe.pt"} <= files and "model.safetensors" not in files
    state = torch.load(ckpt3 / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["batch_idx"], len(state["optimizer"]["param_groups"])) == (3, 3, 2)

    _, resumed = run_script(
        scripts / "patched.py", tmp_path / "resumed", tiny_base, *args, "--resume_from", str(ckpt3), plugins=PROBE
    )
    assert [c[0] for c in resumed[:3]] == ["setup", "on_model_ready", "on_resume"]
    full_losses = {c[1]: c[2:] for c in full if c[0] == "loss"}
    resumed_losses = {c[1]: c[2:] for c in resumed if c[0] == "loss"}
    assert sorted(resumed_losses) == [4, 5, 6] and all(resumed_losses[s] == full_losses[s] for s in (4, 5, 6))
    ckpt6 = f"{exp}--6_chkpt"
    for name in ("adapter_model.safetensors", "probe.pt"):
        assert (tmp_path / "resumed" / "runs" / ckpt6 / name).read_bytes() == (runs / ckpt6 / name).read_bytes()


@needs_upstream
def test_two_ranks_share_checkpoints_and_plugin_parameters(tmp_path, scripts, tiny_base):
    """Two gloo processes, different data per rank: the plugin's parameter (outside DDP) stays identical."""
    args = ("--max_steps", "4", "--save_steps", "2", "--merge_on_save", "false", "--probe.enabled", "true")
    env = {**os.environ, **SHIM_ENV}
    procs = []
    for rank in (0, 1):
        cwd = tmp_path / f"rank{rank}"
        cwd.mkdir()
        args_r = (*args, "--probe.log", str(cwd / "calls.json"), "--run_root_dir", str(tmp_path / "runs"))
        spec = dict(rank=rank, world_size=2, store=str(tmp_path / "pg"), rank_data=True, wandb_log=str(cwd / "w.json"))
        cmd = shim_command(scripts / "patched.py", tiny_base, args_r, PROBE, **spec)
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    calls = [json.loads((tmp_path / f"rank{r}" / "calls.json").read_text()) for r in (0, 1)]
    losses = [[c for c in rank_calls if c[0] == "loss"] for rank_calls in calls]
    assert losses[0][0][2] != losses[1][0][2]  # each rank trains on its own data ...
    assert [c[4] for c in losses[0]] == [c[4] for c in losses[1]] and losses[0][-1][4] != 1.0  # ... one shared scale
    saves = [[c for c in rank_calls if c[0] == "on_save"] for rank_calls in calls]
    assert all(c[2] is not None for c in saves[0]) and all(c[2] is None for c in saves[1])
    (exp,) = [p.name for p in (tmp_path / "runs").iterdir()]  # written once, by rank 0, nothing left over
    assert {"adapter_model.safetensors", "trainer_state.pt", "probe.pt"} <= {
        p.name for p in (tmp_path / "runs" / exp).iterdir()
    }
