"""Every `openvla-align` example in README.md, so the README cannot drift from the CLI, and the README's first screen.

Examples that need no outside data run, with tiny inputs substituted for their paths (`teachers`, `data synth`,
`patch` on a copy of OPENVLA_SRC / OPENVLA_OFT_SRC when it is set); every other one is parsed exactly as the CLI parses
it. The first screen (everything before the first `## ` heading) fits in 40 lines, and its commands are the tested
ones: the two fresh-machine commands are the CI's and scripts/test.sh's, and each host's `finetune.py` line parses in
that host's patched config (the stand-in field lists of test_recipes.py always; the real patched script's with
OPENVLA_SRC / OPENVLA_OFT_SRC).
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openvla_align.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SEPARATORS = {"&&", "||", ";", "|"}
SCREEN_LINES = 40
# The README's first two lines of commands, for a fresh machine: the demo, then the tests.
FRESH_MACHINE = [
    "python3 -m venv .venv && .venv/bin/pip install -c constraints/demo.txt -e '.[demo]' "
    "&& .venv/bin/openvla-align demo",
    "bash scripts/test.sh",
]
# scripts/demo_readme.py writes the demo's summary between these; the picture follows them.
SUMMARY = ("<!-- demo summary: written by scripts/demo_readme.py -->", "<!-- end of demo summary -->")
PICTURE = (
    "![demo: each arm's mean with its 95% interval, the differences with theirs, and attention maps per model]"
    "(docs/images/demo.png)"
)
# host -> (the variable naming a checkout of it, the first screen's title of its section)
HOSTS = {"openvla": ("OPENVLA_SRC", "Use it in OpenVLA"), "openvla-oft": ("OPENVLA_OFT_SRC", "Use it in OpenVLA-OFT")}
TEACHER_PATH = "/models/C-RADIOv3-L"


def bash_blocks(text):
    """The command lines of each ```bash block of ``text`` (continuations joined; blank and comment lines left out)."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def readme_examples():
    """(line, argv after `openvla-align`) for every command in the README's bash blocks (comments ignored)."""
    examples = []
    for block in bash_blocks(README.read_text()):
        for line in block:
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens):
                at_start = i == 0 or tokens[i - 1] in SEPARATORS  # not `pip install openvla-align`
                if (token == "openvla-align" and at_start) or token.endswith("/openvla-align"):
                    rest = tokens[i + 1 :]
                    end = next((j for j, t in enumerate(rest) if t in SEPARATORS), len(rest))
                    examples.append((" ".join(tokens[i : i + 1 + end]), rest[:end]))
    return examples


EXAMPLES = readme_examples()


def test_the_readme_has_examples_of_every_command():
    commands = {argv[0] for _, argv in EXAMPLES}
    assert {"demo", "teachers", "patch", "merge", "data", "eval", "probe", "cache", "bench"} <= commands


UNIQUE_EXAMPLES = dict(EXAMPLES)  # line -> argv, once each (the first screen repeats the host sections' `patch`)


@pytest.mark.parametrize("argv", list(UNIQUE_EXAMPLES.values()), ids=list(UNIQUE_EXAMPLES))
def test_every_readme_example_parses(argv, monkeypatch):
    from openvla_align import argtypes

    # every command's module first: one imported under the patch below would keep the stand-in checks for good (its
    # `from ..argtypes import need_dir`), and a later test of its bad-input errors would fail in the same process
    build_parser(argv)
    for check in ("need_dir", "need_file", "need_output_dir"):  # the examples' paths are not on this machine
        monkeypatch.setattr(argtypes, check, lambda path, *args, **kwargs: Path(path))
    argv = [a.replace("$SLURM_ARRAY_TASK_ID", "3") for a in argv]  # what SLURM puts there, in an array job
    args = build_parser(argv).parse_args(argv)
    assert callable(args.func)


def _example(prefix):
    (argv,) = [argv for _, argv in EXAMPLES if argv[: len(prefix)] == prefix]
    return argv


def test_teachers_example_runs(capsys):
    assert main(_example(["teachers"])) == 0
    assert "c-radio-v3-l" in capsys.readouterr().out


def test_data_synth_example_runs_or_says_what_to_install(tmp_path, capsys):
    argv = [str(tmp_path / "tiny-data") if a == "/tmp/tiny-data" else a for a in _example(["data", "synth"])]
    code = main(argv)
    if importlib.util.find_spec("tensorflow_datasets") is None:
        assert code == 1 and "pip install tensorflow==2.15.0 tensorflow_datasets==4.9.3" in capsys.readouterr().err
        assert not (tmp_path / "tiny-data").exists()  # nothing written before the check
        return
    assert code == 0
    assert len(list((tmp_path / "tiny-data" / "episodes").glob("*.npz"))) == 8
    assert list((tmp_path / "tiny-data" / "rlds").rglob("dataset_info.json"))


# --- the first screen -------------------------------------------------------------------------------------------


def first_screen():
    """The README's lines before its first `## ` heading outside a code block, and that heading."""
    lines, fenced = README.read_text().splitlines(), False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("## "):
            return lines[:i], line
    raise AssertionError("README.md has no `## ` heading")


def heading_anchors(text):
    """GitHub's anchors of the Markdown headings of ``text`` (code blocks skipped)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (match := re.match(r"#+ (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def host_blocks():
    """host -> the first screen's bash block of that host's section (the block after its bold title)."""
    screen = "\n".join(first_screen()[0]) + "\n"
    blocks = {}
    for host, (_, title) in HOSTS.items():
        start = screen.index(f"**{title}**")
        blocks[host] = bash_blocks(screen[start:])[0]
    return blocks


def finetune_args(line):
    """`torchrun ... vla-scripts/finetune.py ARGS`: torchrun's own flags parsed by torchrun's parser; ARGS."""
    from torch.distributed.run import get_args_parser

    tokens = shlex.split(line, comments=True)
    assert tokens[0] == "torchrun", line
    args = get_args_parser().parse_args(tokens[1:])  # an unknown torchrun flag exits here
    assert args.training_script == "vla-scripts/finetune.py", line
    return args.training_script_args


def test_first_screen_fits():
    lines, heading = first_screen()
    assert len(lines) <= SCREEN_LINES, (
        f"README.md has {len(lines)} lines before its first long section ({heading!r}): the first screen is "
        f"{SCREEN_LINES} at most (issue 31)"
    )
    assert lines[0] == "# openvla-align"
    screen = "\n".join(lines) + "\n"
    assert "Don't Blind Your VLA" in screen and "2510.25616" in screen and "OpenVLA-OFT" in screen
    assert bash_blocks(screen)[0] == FRESH_MACHINE  # the first block, verbatim
    assert all(screen.count(marker) == 1 for marker in (*SUMMARY, PICTURE))
    # in this order: the fresh-machine commands, OpenVLA, OpenVLA-OFT, the demo's summary, its picture, the links
    order = [FRESH_MACHINE[1], *(f"**{title}**" for _, title in HOSTS.values()), *SUMMARY, PICTURE, "](#the-demo)"]
    positions = [screen.index(text) for text in order]
    assert positions == sorted(positions), order
    # every link resolves: to a heading of the README or to a file of the checkout
    links = re.findall(r"\]\(([^)\s]+)\)", screen)
    anchors = heading_anchors(README.read_text())
    for link in links:
        assert (link[1:] in anchors) if link.startswith("#") else (ROOT / link).exists(), link
    for section in ("the-demo", "use-it-in-an-openvla-environment", "use-it-in-openvla-oft", "spatial-forcing",
                    "evaluate-on-libero", "reproduce-the-paper", "performance", "diagnostics-the-paper-used",
                    "architecture", "development"):  # fmt: skip
        assert f"#{section}" in links, f"the first screen links to every long section: #{section} is missing"
    assert "docs/dev/testing.md" in links


def test_first_screen_commands_are_the_ones_tested():
    """Every first-screen command is one the tests run or parse as a user would type it."""
    import draccus
    from test_recipes import FIELDS, OFT_FIELDS, finetune_config

    from openvla_align.openvla.hosts import host_of

    screen = "\n".join(first_screen()[0]) + "\n"
    blocks = bash_blocks(screen)
    # the fresh machine's: the tests are the CI's command; the demo installs its lock, whose torch is scripts/test.sh's
    assert blocks[0] == FRESH_MACHINE
    assert FRESH_MACHINE[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "/pip install -c constraints/demo.txt -e '.[demo]' &&" in FRESH_MACHINE[0]
    torch_pins = re.search(r"^torch_pins=\((.*)\)$", (ROOT / "scripts" / "test.sh").read_text(), re.M).group(1)
    lock = (ROOT / "constraints" / "demo.txt").read_text().splitlines()
    assert set(torch_pins.split()) <= set(lock), "the demo's lock installs the torch the tests run"
    dist = importlib.metadata.distribution("openvla-align")  # what `pip install openvla-align` and `-e .` install
    assert dist.metadata["Name"] == "openvla-align" and "demo" in dist.metadata.get_all("Provides-Extra")
    assert "openvla-align" in {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}
    assert FRESH_MACHINE[0].endswith("&& .venv/bin/openvla-align demo") and ["demo"] in UNIQUE_EXAMPLES.values()
    # each host: install, patch (run by the test below on a copy of the host), its finetune.py line
    blocks = host_blocks()
    assert len(bash_blocks(screen)) == 1 + len(blocks), "the first screen's bash blocks: fresh machine, one per host"
    fields = {"openvla": FIELDS, "openvla-oft": OFT_FIELDS}  # checked against the real scripts by test_recipes.py
    for host, block in blocks.items():
        assert len(block) == 3 and block[:2] == ["pip install openvla-align", f"openvla-align patch /path/to/{host}"]
        assert ["patch", f"/path/to/{host}"] in UNIQUE_EXAMPLES.values()  # parsed by test_every_readme_example_parses
        cfg = draccus.parse(config_class=finetune_config(fields[host]), args=finetune_args(block[2]))
        assert host_of(cfg).name == host  # the plugins recognise the host from the config
        assert cfg.align.enabled and cfg.align.teacher_path == TEACHER_PATH, block[2]


@pytest.mark.parametrize("host", HOSTS)
def test_first_screen_commands_run_on_a_copy_of_the_host(host, tmp_path, capsys):
    """Every README `patch` example of the host runs on a copy of it, and the first screen's finetune.py line parses
    in the patched script's own config (its FinetuneConfig and plugin block, draccus, the installed plugins)."""
    from test_patch import plugin_block, upstream_config_source, write_stub

    from openvla_align.openvla import patch as P

    variable = HOSTS[host][0]
    if not os.environ.get(variable):
        pytest.skip(
            f"{variable} is unset (a checkout of {host}): the README's `patch /path/to/{host}` is parsed only and its "
            "finetune.py flags are checked against the stand-in config (scripts/test.sh sets OPENVLA_SRC in its "
            "openvla-pins phase and OPENVLA_OFT_SRC in its OFT phase, which runs this case)"
        )
    checkout = tmp_path / host
    shutil.copytree(os.environ[variable], checkout, ignore=shutil.ignore_patterns(".git", "*.orig"))
    examples = [argv for argv in UNIQUE_EXAMPLES.values() if argv[:1] == ["patch"] and f"/path/to/{host}" in argv]
    assert examples
    for argv in examples:
        assert main([str(checkout) if a == f"/path/to/{host}" else a for a in argv]) == 0
    assert main(["patch", "--check", str(checkout)]) == 0
    assert "patched" in capsys.readouterr().out

    patched = (checkout / P.load_patch(P.patch_dir(host)).target).read_text()
    stub = write_stub(tmp_path / "finetune_stub.py", upstream_config_source(patched), plugin_block(patched))
    line = host_blocks()[host][2]
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(stub), *finetune_args(line)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("CONFIG="))[len("CONFIG=") :])
    assert cfg["align"]["enabled"] is True and cfg["align"]["teacher_path"] == TEACHER_PATH, line
    assert ("num_images_in_input" in cfg) == (host == "openvla-oft")  # the host's own config, not the other one's
