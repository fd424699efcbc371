"""The benchmark's report: a table on stdout, `bench.json` and `bench.png`, and
`scale.png` when scenario 10 ran (its curves)."""

import json
import os
import platform
import re
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from deploy.bench.scale import MEASURES
from deploy.bench.scale import NUMBER as SCALE
from deploy.bench.scenarios import Goal, Result


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "celery": version("celery"),
        "django": version("django"),
    }


def summary(result: Result) -> dict[str, dict[str, float]]:
    """Median, min and max of each figure over the repetitions that have it: some are
    measured once, with the last repetition (scenario 9's query counts, 11's replay)."""
    keys = list(dict.fromkeys(key for rep in result.reps for key in rep))
    stats = {}
    for key in keys:
        values = [rep[key] for rep in result.reps if key in rep]
        stats[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return stats


def verdicts(result: Result) -> list[tuple[str, float, bool]]:
    stats = summary(result)
    return [(str(g), stats[g.key]["median"], g.met(stats[g.key]["median"])) for g in result.goals]


def _number(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: list[Result], peak_rss: dict[str, int], info: dict[str, Any]) -> str:
    lines = [
        f"{info['date']}, {info['cpus']} cores ({info['cpu']}), Python {info['python']}, "
        f"Celery {info['celery']}, Django {info['django']}",
        "",
        f"{'scenario / figure':<42} {'median':>10} {'min':>10} {'max':>10}",
    ]
    for result in sorted(results, key=lambda r: r.number):
        lines.append(f"{result.number}. {result.title}")
        stats = summary(result)
        for key, figure in stats.items():
            lines.append(
                f"   {key:<39} {_number(figure['median']):>10} {_number(figure['min']):>10} "
                f"{_number(figure['max']):>10}"
            )
        for goal, (name, value, met) in zip(result.goals, verdicts(result), strict=True):
            verdict = "met" if met else "NOT MET"
            lines.append(f"   goal {name:<34} {_number(value):>10} {verdict:>21}")
            if goal.spread in stats:
                low, high = stats[goal.spread]["min"], stats[goal.spread]["max"]
                lines.append(
                    f"   (pooled over the repetitions; {goal.spread} per repetition "
                    f"{_number(low)}-{_number(high)})"
                )
        lines.extend(f"   ({note})" for note in result.notes)
    lines.append("peak RSS (MiB)")
    lines.extend(f"   {role:<39} {kib / 1024:>10.0f}" for role, kib in sorted(peak_rss.items()))
    return "\n".join(lines)


def keep_raw(results: list[Result], out: Path) -> None:
    """Each finished scenario's repetitions as measured, to `raw.json`: written after every
    scenario, before anything summarizes them."""
    out.mkdir(parents=True, exist_ok=True)
    raw = [
        {"number": r.number, "title": r.title, "repetitions": r.reps, "notes": r.notes}
        for r in results
    ]
    (out / "raw.json").write_text(json.dumps(raw, indent=2, default=str))


def write(
    results: list[Result], peak_rss: dict[str, int], info: dict[str, Any], out: Path, args: Any
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": info,
        "settings": vars(args),
        "scenarios": [
            {
                "number": r.number,
                "title": r.title,
                "summary": summary(r),
                "repetitions": r.reps,
                "goals": [
                    {"goal": goal, "median": value, "met": met} for goal, value, met in verdicts(r)
                ],
                "notes": r.notes,
            }
            for r in sorted(results, key=lambda r: r.number)
        ],
        "peak_rss_mib": {role: round(kib / 1024, 1) for role, kib in peak_rss.items()},
    }
    (out / "bench.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "bench.txt").write_text(table(results, peak_rss, info) + "\n")
    chart(results, out / "bench.png")
    for result in results:
        if result.number == SCALE:
            scale_chart(result, out / "scale.png")


@dataclass
class Bar:
    """One goal in `bench.png`: its value as a share of the bound (higher is better: past
    1 the goal is met) and how far the whisker reaches below and above it."""

    label: str
    score: float
    below: float
    above: float
    met: bool


def bars(results: list[Result]) -> list[Bar]:
    """A bar per goal: the median; the whisker min to max of the repetitions (a pooled
    goal, one value per run: the range of its figure per repetition)."""
    found = []
    for result in sorted(results, key=lambda r: r.number):
        stats = summary(result)
        for goal in result.goals:
            s = stats[goal.key]

            def score(value: float, goal: Goal = goal) -> float:
                if goal.op == ">=":
                    return value / goal.bound
                return goal.bound / value if value else (2.0 if goal.bound == 0 else 0.0)

            if goal.bound == 0:  # "no errors": 1 when met, 0 otherwise
                median = low = high = 1.0 if s["median"] <= 0 else 0.0
            else:
                spread = stats.get(goal.spread, s)
                low, high = sorted([score(spread["min"]), score(spread["max"])])
                median = score(s["median"])
            found.append(
                Bar(
                    f"{result.number}. {goal}" + (" (pooled)" if goal.spread else ""),
                    median,
                    max(0.0, median - low),
                    max(0.0, high - median),
                    goal.met(s["median"]),
                )
            )
    return found


def chart(results: list[Result], path: Path) -> None:
    """`bars()` drawn: green where the goal is met, red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = bars(results)
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(drawn) + 1.2), dpi=100)
    positions = range(len(drawn))
    axes.barh(
        positions,
        [bar.score for bar in drawn],
        xerr=[[bar.below for bar in drawn], [bar.above for bar in drawn]],
        color=["#2e7d32" if bar.met else "#c62828" for bar in drawn],
        capsize=3,
    )
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_yticks(list(positions), [bar.label for bar in drawn], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("measured / goal (1 = the goal exactly; right of the line: met)")
    axes.set_title("make bench: each goal, median of the repetitions (whiskers: min-max)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def scale_chart(result: Result, path: Path) -> None:
    """Scenario 10's curves: each measure against the size of its table (log axis), its
    bound as a dashed line where a goal sets one at the largest size. A flat line is a
    cost that does not grow with the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float]]] = {}
    for key, stats in summary(result).items():
        if match := re.fullmatch(r"(.+)_(\d+)", key):
            curves.setdefault(match[1], []).append((int(match[2]), stats["median"]))
    bounds = {goal.key: goal for goal in result.goals}
    columns = 2
    rows = (len(curves) + columns - 1) // columns
    figure, grid = plt.subplots(
        rows, columns, figsize=(10, 2.8 * rows + 0.6), dpi=100, squeeze=False
    )
    for axes, (measure, points) in zip(grid.flat, curves.items(), strict=False):
        points.sort()
        title, table_name = MEASURES.get(measure, (measure, "rows"))
        sizes, values = [p[0] for p in points], [p[1] for p in points]
        axes.plot(sizes, values, marker="o", color="#1565c0")
        for size, value in points:
            axes.annotate(
                _number(value),
                (size, value),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        goal = bounds.get(f"{measure}_{sizes[-1]}")
        if goal is not None:
            met = goal.met(values[-1])
            axes.axhline(
                goal.bound,
                color="#2e7d32" if met else "#c62828",
                linestyle="--",
                linewidth=1,
                label=f"goal {goal.op} {goal.bound:g}",
            )
            axes.legend(fontsize=8, loc="upper left")
        axes.set_xscale("log")
        axes.set_ylim(bottom=0, top=max([*values, goal.bound if goal else 0]) * 1.25 or 1)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel(table_name, fontsize=8)
        axes.tick_params(labelsize=8)
    for axes in list(grid.flat)[len(curves) :]:
        axes.set_visible(False)
    figure.suptitle(f"make bench, {result.number}. {result.title} (median)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.98))  # the title above the top row's
    figure.savefig(path)
    plt.close(figure)
