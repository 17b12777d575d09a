"""`openvla-align eval report RUN... [--baseline RUN]`: the paper's tables from evaluation results.

LIBERO results (``libero_<suite>-<task>``) get OpenVLA-OFT's tables instead: success per suite and per task, each
the successes over all its episodes (every seed's) with Wilson's 95 % interval, and overall (all tasks' episodes
pooled: with OFT's equal 50 episodes per task, the mean of the suite rates).

Per environment: mean ± SD over seeds (sample SD, n-1; Table 1). Per OOD axis: the mean of the environment means.
Against a baseline: a one-sided paired Wilcoxon signed-rank test per axis over the (environment, seed) pairs both
runs have, H1 "the baseline's success is higher" (the ablation tables compare every row with the best one).
VL-Think: success per domain. Missing seeds, environments some runs lack and duplicate runs are listed under
Problems and marked in the tables (``*``: fewer seeds than another run has), never averaged over silently.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .._io import save_figure
from ..stats import wilcoxon_greater
from .envs import OOD_AXES, VL_THINK, axis_of, short_name
from .results import Run, load_run


@dataclass
class Cell:
    mean: float
    sd: Optional[float]
    n: int
    short: bool = False  # fewer seeds than the most any run has for this environment

    def text(self) -> str:
        sd = f" ± {self.sd:.2f}" if self.sd is not None else ""
        return f"{self.mean:.2f}{sd}{'*' if self.short else ''}"


@dataclass
class Report:
    runs: List[Run]
    baseline: Optional[Run]
    envs: List[str]
    cells: Dict[Tuple[str, str], Cell] = field(default_factory=dict)  # (run label, env) -> cell
    axes: Dict[Tuple[str, str], Tuple[float, int]] = field(default_factory=dict)  # (run, axis) -> (mean, n envs)
    tests: Dict[Tuple[str, str], dict] = field(default_factory=dict)  # (run, axis) -> wilcoxon result
    problems: List[str] = field(default_factory=list)


def _cell(values: List[float]) -> Cell:
    return Cell(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def build_report(runs: List[Run], baseline: Optional[Run] = None) -> Report:
    labels = [r.label for r in runs]
    problems = [p for r in runs for p in r.problems]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"duplicate run label {label!r}: {labels.count(label)} runs share it; rename one directory")
    roots = [r.root.resolve() for r in runs]
    for root in sorted({x for x in roots if roots.count(x) > 1}):
        problems.append(f"duplicate run: {root} is given more than once")
    seen: Dict[tuple, str] = {}
    for r in runs:
        signature = tuple(sorted(r.cells.items()))
        if signature in seen and seen[signature] != r.label:
            problems.append(f"duplicate runs: {seen[signature]!r} and {r.label!r} hold identical results")
        seen.setdefault(signature, r.label)

    all_envs = sorted({e for r in runs for e in r.envs()}, key=_env_order)
    for r in runs:
        missing = [short_name(e) for e in all_envs if e not in r.envs()]
        if missing:
            problems.append(f"{r.label}: no results for {', '.join(missing)} (other runs have them)")
    report = Report(runs, baseline, all_envs, problems=problems)
    for env in all_envs:
        seed_sets = {r.label: set(r.seeds(env)) for r in runs if env in r.envs()}
        most = max(len(s) for s in seed_sets.values())
        union = set().union(*seed_sets.values())
        for r in runs:
            seeds = r.seeds(env)
            if not seeds:
                continue
            lacking = sorted(union - set(seeds))
            if lacking:
                report.problems.append(f"{r.label}: {short_name(env)} lacks seed(s) {', '.join(lacking)}")
            cell = _cell(list(seeds.values()))
            cell.short = len(seeds) < most
            report.cells[(r.label, env)] = cell
    for r in runs:
        for axis, envs in OOD_AXES.items():
            means = [report.cells[(r.label, e)].mean for e in envs if (r.label, e) in report.cells]
            if means:
                report.axes[(r.label, axis)] = (statistics.fmean(means), len(means))
    if baseline is not None:
        for r in runs:
            if r is baseline:
                continue
            for axis, envs in OOD_AXES.items():
                pairs = [
                    (baseline.cells[k], r.cells[k]) for k in sorted(r.cells) if k[0] in envs and k in baseline.cells
                ]
                if pairs:
                    base, run = zip(*pairs)
                    report.tests[(r.label, axis)] = {**wilcoxon_greater(base, run), "pairs": len(pairs)}
    return report


def _env_order(env: str) -> Tuple[int, str]:
    order = [e for envs in OOD_AXES.values() for e in envs] + list(VL_THINK)
    return (order.index(env), env) if env in order else (len(order), env)


# --------------------------------------------------------------------------------------------------- LIBERO
LIBERO_TASK = re.compile(r"^(libero_[a-z0-9]+)-(\d+)$")
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Tuple[float, float]:
    """Wilson's score interval of a success rate (``successes`` of ``n`` episodes): within [0, 1] and not a point at
    0 % or 100 %, where the normal approximation collapses."""
    import math
    from statistics import NormalDist

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a success rate needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Rate:
    """Successes of ``n`` episodes, with Wilson's 95 % interval."""

    successes: int
    n: int

    @property
    def rate(self) -> float:
        return self.successes / self.n

    def interval(self) -> Tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    def text(self) -> str:
        low, high = self.interval()
        return f"{self.rate:.3f} [{low:.3f}, {high:.3f}] ({self.successes}/{self.n})"


def libero_task(env_id: str) -> Optional[Tuple[str, int]]:
    """``(suite, task)`` of a LIBERO environment id, else None."""
    m = LIBERO_TASK.match(env_id)
    return (m.group(1), int(m.group(2))) if m else None


def libero_rates(run: Run) -> Dict[Tuple[str, object], Rate]:
    """``(suite, task)`` -> its episodes pooled over seeds; ``(suite, "all")`` per suite; ``("all", "all")``."""
    rates: Dict[Tuple[str, object], Rate] = {}
    for key, rate in run.cells.items():
        task = libero_task(key[0])
        n = run.episodes.get(key)
        if task is None or not n:
            continue
        k = round(rate * n)
        for group in (task, (task[0], "all"), ("all", "all")):
            have = rates.get(group, Rate(0, 0))
            rates[group] = Rate(have.successes + k, have.n + n)
    return rates


def _suite_order(suite: str) -> Tuple[int, str]:
    return (LIBERO_SUITES.index(suite), suite) if suite in LIBERO_SUITES else (len(LIBERO_SUITES), suite)


def libero_markdown(runs: List[Run]) -> str:
    rates = {r.label: libero_rates(r) for r in runs}
    suites = sorted({s for per in rates.values() for s, t in per if s != "all"}, key=_suite_order)
    if not suites:
        return ""
    out = io.StringIO()
    w = out.write
    w("\n## LIBERO: success rate per suite (successes over episodes, Wilson 95 % interval)\n\n")
    w("| run | " + " | ".join(suites) + " | overall |\n" + "|---" * (len(suites) + 2) + "|\n")
    for r in runs:
        cells = [rates[r.label].get(key) for key in [(s, "all") for s in suites] + [("all", "all")]]
        w(f"| {r.label} | " + " | ".join(c.text() if c else "–" for c in cells) + " |\n")
    for suite in suites:
        tasks = sorted({t for per in rates.values() for s, t in per if s == suite and t != "all"})
        w(f"\n### {suite} per task\n\n| task | instruction | " + " | ".join(r.label for r in runs) + " |\n")
        w("|---" * (len(runs) + 2) + "|\n")
        for t in tasks:
            env = f"{suite}-{t}"
            text = next((r.instructions[env] for r in runs if env in r.instructions), "")
            cells = [rates[r.label].get((suite, t)) for r in runs]
            w(f"| {t} | {text} | " + " | ".join(c.text() if c else "–" for c in cells) + " |\n")
    return out.getvalue()


# --------------------------------------------------------------------------------------------------- output
def markdown(report: Report) -> str:
    out = io.StringIO()
    w = out.write
    w("# Evaluation report\n\n")
    for r in report.runs:
        w(f"- `{r.label}`: {r.root}{' (baseline)' if r is report.baseline else ''}\n")
    w("\n## Problems\n\n")
    w("".join(f"- {p}\n" for p in report.problems) if report.problems else "none\n")
    ood = [e for e in report.envs if axis_of(e) in OOD_AXES]
    if ood:
        w("\n## Success rate per environment (mean ± SD over seeds; * = fewer seeds than another run)\n\n")
        w("| run | " + " | ".join(f"{short_name(e)} ({axis_of(e)[0]})" for e in ood) + " |\n")
        w("|---" * (len(ood) + 1) + "|\n")
        for r in report.runs:
            cells = [report.cells[(r.label, e)].text() if (r.label, e) in report.cells else "–" for e in ood]
            w(f"| {r.label} | " + " | ".join(cells) + " |\n")
        w("\n## Per-axis means\n\n| run | " + " | ".join(OOD_AXES) + " |\n" + "|---" * (len(OOD_AXES) + 1) + "|\n")
        for r in report.runs:
            vals = []
            for axis in OOD_AXES:
                mean, n = report.axes.get((r.label, axis), (None, 0))
                full = n == len(OOD_AXES[axis])
                vals.append("–" if mean is None else f"{mean:.3f}" + ("" if full else f" ({n}/{len(OOD_AXES[axis])})"))
            w(f"| {r.label} | " + " | ".join(vals) + " |\n")
    if report.tests:
        w(f"\n## One-sided paired Wilcoxon signed-rank vs `{report.baseline.label}` (H1: the baseline is higher)\n\n")
        w("| run | " + " | ".join(f"{a} p (pairs)" for a in OOD_AXES) + " |\n" + "|---" * (len(OOD_AXES) + 1) + "|\n")
        for r in report.runs:
            if r is report.baseline:
                continue
            vals = []
            for axis in OOD_AXES:
                t = report.tests.get((r.label, axis))
                vals.append("–" if t is None else f"{t['p']:.3g} ({t['pairs']})")
            w(f"| {r.label} | " + " | ".join(vals) + " |\n")
    think = [e for e in report.envs if e in VL_THINK]
    if think:
        w("\n## VL-Think success per domain\n\n| run | " + " | ".join(VL_THINK[e] for e in think) + " |\n")
        w("|---" * (len(think) + 1) + "|\n")
        for r in report.runs:
            cells = [report.cells[(r.label, e)].text() if (r.label, e) in report.cells else "–" for e in think]
            w(f"| {r.label} | " + " | ".join(cells) + " |\n")
    w(libero_markdown(report.runs))
    return out.getvalue()


def write_csvs(report: Report, out: Path) -> List[Path]:
    from .._io import atomic_write_bytes

    def table(name, header, rows):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        atomic_write_bytes(out / name, buf.getvalue().encode())
        return out / name

    def fmt(v):
        return "" if v is None else f"{v:.6g}"

    files = [
        table(
            "environments.csv",
            ["run", "env_id", "axis", "mean", "sd", "seeds", "fewer_seeds"],
            [
                [label, env, axis_of(env) or "", fmt(c.mean), fmt(c.sd), c.n, int(c.short)]
                for (label, env), c in report.cells.items()
            ],
        ),
        table(
            "axes.csv", ["run", "axis", "mean", "envs"], [[k[0], k[1], fmt(v[0]), v[1]] for k, v in report.axes.items()]
        ),
    ]
    libero = [
        [r.label, suite, task, r.instructions.get(f"{suite}-{task}", ""), c.successes, c.n, fmt(c.rate)]
        + [fmt(v) for v in c.interval()]
        for r in report.runs
        for (suite, task), c in sorted(libero_rates(r).items(), key=lambda kv: str(kv[0]))
    ]
    if libero:
        header = ["run", "suite", "task", "instruction", "successes", "episodes", "rate", "low95", "high95"]
        files.append(table("libero.csv", header, libero))
    if report.tests:
        files.append(
            table(
                "wilcoxon.csv",
                ["run", "baseline", "axis", "pairs", "nonzero", "w_plus", "p", "method"],
                [
                    [k[0], report.baseline.label, k[1], t["pairs"], t["n"], fmt(t["w_plus"]), fmt(t["p"]), t["method"]]
                    for k, t in report.tests.items()
                ],
            )
        )
    return files


def write_charts(report: Report, out: Path) -> List[Path]:
    """One PNG bar chart per axis (and VL-Think): bars per run, SD as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    groups = {**OOD_AXES, "VL-Think": tuple(VL_THINK)}
    for axis, envs in groups.items():
        envs = [e for e in envs if e in report.envs]
        if not envs:
            continue
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(envs), 3.2))
        width = 0.8 / len(report.runs)
        for i, r in enumerate(report.runs):
            cells = [report.cells.get((r.label, e)) for e in envs]
            xs = [j + i * width for j in range(len(envs))]
            ax.bar(
                xs,
                [c.mean if c else 0 for c in cells],
                width,
                yerr=[(c.sd or 0) if c else 0 for c in cells],
                label=r.label,
                capsize=2,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(envs))])
        ax.set_xticklabels([short_name(e) for e in envs], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("success rate")
        ax.set_title(axis)
        ax.legend(fontsize=7)
        files.append(save_figure(fig, out / f"{axis.lower().replace('-', '')}.png", 120))
        plt.close(fig)
    return files


def _cmd_report(args) -> int:
    runs = [load_run(p, obj_set=args.obj_set) for p in args.runs]
    baseline = None
    if args.baseline:
        base_root = Path(args.baseline).resolve()
        baseline = next((r for r in runs if r.root.resolve() == base_root), None)
        if baseline is None:
            baseline = load_run(args.baseline, obj_set=args.obj_set)
            runs.insert(0, baseline)
    report = build_report(runs, baseline)
    text = markdown(report)
    print(text)
    if args.out:
        from .._io import atomic_write_bytes

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "report.md", text.encode())
        files = [out / "report.md", *write_csvs(report, out)]
        try:
            files += write_charts(report, out)
        except ImportError:
            print("matplotlib is not installed: no charts (pip install 'openvla-align[probe]')")
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report")
    p.add_argument("runs", nargs="+", help="run directories: RUN/<env_id>/<obj_set>/<seed>/{result.json,stats.yaml}")
    p.add_argument("--baseline", default=None, help="run to test every other run against (one-sided Wilcoxon)")
    p.add_argument(
        "--obj-set",
        default="",
        help="object set to read (default: each environment's evaluation set: Simpler's `test`, LIBERO's `default`)",
    )
    p.add_argument("--out", default=None, help="directory for report.md, CSVs and PNG charts")
    p.set_defaults(func=_cmd_report)
    return p
