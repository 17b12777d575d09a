"""Write the README's demo results from two demo runs of the checkout's code, at 1 and at 2 torch threads.

    openvla-align demo --out /tmp/d1 --threads 1                # the README's first command (default: 1 thread)
    openvla-align demo --out /tmp/d2 --threads 2 --workers 1
    python scripts/demo_readme.py /tmp/d1 /tmp/d2 [--time-log time.txt]   # time.txt: /usr/bin/time -v of the first

It refuses runs of other code than the checkout's (the code fingerprint of the files each run imported) or of a
tree with uncommitted changes, then writes ``docs/demo/run.json`` and ``docs/demo/other.json`` (each run's
metrics without the per-step history), ``docs/images/demo.png`` (the first run's picture) and the README block
between the demo markers. ``tests/test_demo_readme.py`` checks that the README block is this script's rendering of
those files and that their fingerprint is the checkout's, so changing the demo's code without re-running fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, whatever is installed

from openvla_align._io import atomic_write, atomic_write_bytes  # noqa: E402
from openvla_align.demo.code import source_fingerprint  # noqa: E402
from openvla_align.numerics import describe  # noqa: E402

BEGIN, END = "<!-- demo results: written by scripts/demo_readme.py -->", "<!-- end of demo results -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- demo summary: written by scripts/demo_readme.py -->", "<!-- end of demo summary -->"
RUN, OTHER = ROOT / "docs" / "demo" / "run.json", ROOT / "docs" / "demo" / "other.json"
PICTURE = ROOT / "docs" / "images" / "demo.png"


def load_run(out: Path) -> Dict:
    path = Path(out) / "metrics.json"
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a finished demo run ({e}); run `openvla-align demo --out {out}` first.")
    run.pop("history", None)
    return run


def check_code(run: Dict, name: str) -> None:
    code = run.get("code") or {}
    if not code.get("files"):
        raise SystemExit(f"{name} records no code identity; re-run the demo with this checkout.")
    now = source_fingerprint(code["files"])
    if code["fingerprint"] != now:
        raise SystemExit(f"{name} ran other code (fingerprint {code['fingerprint']}, checkout {now}); re-run it.")
    if not code.get("git") or code["git"]["dirty"]:
        raise SystemExit(f"{name} ran from a tree with uncommitted changes; commit, then re-run the demo.")


def same_verdict(a: Dict, b: Dict) -> bool:
    return a["words"] == b["words"]


def _time_line(time_log: Optional[Dict]) -> str:
    if not time_log:
        return ""
    return (
        f" `/usr/bin/time -v openvla-align demo`: {time_log['wall_s']:.0f} s wall, "
        f"{time_log['max_rss_gib']:.2f} GiB max RSS."
    )


def render(run: Dict, other: Dict) -> str:
    """The README block, from the two recorded runs (``run`` is the one shown)."""
    code, cfg = run["code"], run["config"]
    v = code["versions"]
    threads = (cfg["threads"], other["config"]["threads"])
    agree = "the same verdict on every metric" if same_verdict(run, other) else "a DIFFERENT verdict"
    diffs = [
        f"{k}: {run['words'][k]} vs {other['words'][k]}" for k in run["words"] if run["words"][k] != other["words"][k]
    ]
    lines = [
        BEGIN,
        f"This copy is the output of `openvla-align demo` (seeds {' '.join(map(str, cfg['seeds']))}, "
        f"{cfg['threads']} torch thread per run, {cfg['steps']} LoRA steps) at commit {code['git']['commit'][:7]} "
        f"with the lock's packages (`constraints/demo.txt`: torch {v['torch']}, transformers {v['transformers']}, "
        f"timm {v['timm']}, peft {v['peft']}, numpy {v['numpy']}) on {describe(run['world'])}, "
        f"{run['world']['cpu_count']} cores: {run['seconds']['total']:.0f} s in the process."
        + _time_line(run.get("time_log"))
        + f" It printed figures fingerprint `{run['fingerprint']}`: the README's first command prints the same on "
        "any x86-64 CPU with AVX2, whatever its cores (see [the demo](#the-demo))."
        + f" A second run at {threads[1]} torch threads per run (`--threads {threads[1]} --workers 1`) gave "
        f"{agree}" + (f" ({'; '.join(diffs)})" if diffs else "") + "; its fine-tuning and evaluation took "
        f"{other['seconds']['fine-tuning + evaluation']:.0f} s against {run['seconds']['fine-tuning + evaluation']:.0f}"
        " s here. Both runs' per-seed results are in `docs/demo/`, and `scripts/demo_readme.py` wrote this section "
        "from them.",
        "",
        "```text",
        run["table"],
        "",
        *["  " + line for line in run["verdict"]],
        run["conclusion"],
        "time per stage: " + ", ".join(f"{k} {s:.0f} s" for k, s in run["seconds"].items()),
        "```",
        END,
    ]
    return "\n".join(lines)


def _mean_ci(row: Dict, run: str) -> str:
    m = row[run]["mean"]
    return f"{m['mean']:.2f} [{m['low']:.2f}, {m['high']:.2f}]"


def render_summary(run: Dict) -> str:
    """The README's first-screen lines: what the miniature shows, read from the run's intervals and words."""
    s, words, base, cfg = run["summary"], run["words"], run["base"], run["config"]
    labels = {
        "cosine": "the aligned layer's cosine to the teacher",
        "probe": "the object probe",
        "probe_place": "the place probe",
        "probe_mean": "the all-token probe",
        "vl": "VL answers",
        "id": "in-distribution sorting",
        "ood_objects": "OOD-object sorting",
        "ood_scenes": "OOD-scene sorting",
    }

    def ci(iv: Dict) -> str:
        return f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"

    def arm(kind: str, coeff: float) -> str:
        up = [f"{labels[k]} {ci(s[k][kind])}" for k in labels if words[k][kind] == "beats"]
        down = [f"{labels[k]} {ci(s[k][kind])}" for k in labels if words[k][kind] == "worse"]
        said = ([f"raises {'; '.join(up)}"] if up else []) + ([f"lowers {'; '.join(down)}"] if down else [])
        rest = "no difference shown on the other metrics" if said else "no difference shown on any metric"
        return f"- alignment at {float(coeff)}, paired by seed against SFT: " + "; ".join(said + [rest]) + "."

    lost = [
        f"{labels[k]} {base[k]:.2f} -> {s[k]['sft']['mean']['mean']:.2f}"
        for k in labels
        if words[k]["sft_vs_base"] == "degraded"
    ]
    lines = [
        SUMMARY_BEGIN,
        f"**The demo's result** (tiny models, generated scenes; {len(cfg['seeds'])} seeds per arm, 95 % intervals; "
        f"commit {run['code']['git']['commit'][:7]}; pinned to print the same figures on any x86-64 CPU with AVX2, "
        f"fingerprint `{run['fingerprint']}`):",
        f"- plain LoRA SFT learns the robot task: in-distribution sorting {_mean_ci(s['id'], 'sft')} (base VLA "
        f"{base['id']:.2f}), unseen tables {_mean_ci(s['ood_scenes'], 'sft')}, unseen hue x shade blocks "
        f"{_mean_ci(s['ood_objects'], 'sft')}; "
        + (f"it loses {'; '.join(lost)}." if lost else "it loses nothing measured of the base VLA."),
        arm("align_vs_sft", cfg["coeff"]),
        arm("strong_vs_sft", cfg["strong_coeff"]),
        "- a miniature of the paper's setup, not of its 7B model or benchmarks: what it shows holds at this scale "
        "only ([plainly](#what-this-shows-plainly)).",
        SUMMARY_END,
    ]
    return "\n".join(lines)


def replace_block(readme: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if len(pattern.findall(readme)) != 1:
        raise SystemExit(f"README.md must hold the demo markers exactly once ({begin!r} ... {end!r}).")
    return pattern.sub(lambda _: block, readme)


def parse_time_log(path: Path) -> Dict[str, float]:
    text = Path(path).read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise SystemExit(f"{path} is not the output of /usr/bin/time -v.")
    h, m, s = wall.groups()
    return {"wall_s": int(h or 0) * 3600 + int(m) * 60 + float(s), "max_rss_gib": int(rss.group(1)) / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the demo run the README shows")
    p.add_argument("other", type=Path, help="the same code's run at the other thread count")
    p.add_argument("--time-log", type=Path, help="/usr/bin/time -v output of the first run")
    args = p.parse_args(argv)
    run, other = load_run(args.run), load_run(args.other)
    for name, r in (("run", run), ("other", other)):
        check_code(r, name)
        if not (r.get("world") or {}).get("pinned"):
            raise SystemExit(
                f"{name} ran on its CPU's own code paths (OPENVLA_ALIGN_NATIVE_CPU set, or not x86-64): its figures "
                "are that machine's only; re-run it without."
            )
    if run["code"]["fingerprint"] != other["code"]["fingerprint"]:
        raise SystemExit("The two runs ran different code; run both from the same commit.")
    if run["config"]["threads"] == other["config"]["threads"]:
        raise SystemExit("The two runs used the same thread count; the second must use another (e.g. --threads 2).")
    if args.time_log:
        run["time_log"] = parse_time_log(args.time_log)
    readme_path = ROOT / "README.md"
    readme = replace_block(readme_path.read_text(), render(run, other))
    readme = replace_block(readme, render_summary(run), SUMMARY_BEGIN, SUMMARY_END)
    picture = args.run / "demo.png"
    if not picture.is_file():
        raise SystemExit(f"{picture} is missing (matplotlib not installed?); install openvla-align[demo] and re-run.")
    for path, data in ((RUN, run), (OTHER, other)):
        atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    atomic_write(PICTURE, lambda tmp: shutil.copyfile(picture, tmp))
    atomic_write_bytes(readme_path, readme.encode())
    print(f"wrote {RUN.relative_to(ROOT)}, {OTHER.relative_to(ROOT)}, {PICTURE.relative_to(ROOT)} and README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
