"""The chart of a ``python -m benchmarks`` run: per profile, req/s and CPU µs per request of each target.

    python -m benchmarks.chart benchmarks/results/profiles-<timestamp>.json [-o chart.png]

Needs matplotlib (the ``benchmarks`` extra); without it the chart is skipped with a message and
nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

COLORS = {"direct": "#9e9e9e", "gateway": "#1f77b4", "gateway-memory": "#6baed6", "gateway-proxied": "#08306b", "nginx": "#2ca02c", "node": "#ff7f0e"}
MISSING = "matplotlib is not installed (pip install matplotlib, or the project's `benchmarks` extra)"


def render(report: dict[str, Any], path: Path) -> tuple[Path | None, str]:
    """Writes the PNG; (path, "") or (None, why it was skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, MISSING
    cells = report["summary"]["cells"]
    ratios = report["summary"]["ratios"]
    profiles = [key for key in report["profiles"] if any(cell["profile"] == key for cell in cells.values())]
    if not profiles:
        return None, "no measured runs to draw"
    rows = (("rps", "req/s (median, min–max; log)"), ("cpu_us_per_request", "CPU µs per request (median, min–max; log)"))
    fig, axes = plt.subplots(len(rows), len(profiles), figsize=(4.2 * len(profiles), 8.5), squeeze=False)
    for col, key in enumerate(profiles):
        targets = [t for t in report.get("targets", []) if f"{key}/{t}" in cells]
        for row, (field, label) in enumerate(rows):
            ax = axes[row][col]
            values = [cells[f"{key}/{t}"][field] for t in targets]
            medians = [v.get("median", 0) for v in values]
            low = [m - v.get("min", m) for m, v in zip(medians, values)]
            high = [v.get("max", m) - m for m, v in zip(medians, values)]
            bars = ax.bar([t.replace("-", "\n") for t in targets], medians, yerr=[low, high], capsize=4, color=[COLORS.get(t, "#777") for t in targets])
            for bar, value in zip(bars, medians):
                ax.annotate(f"{value:,.0f}" if field == "rps" else f"{value:,.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            ax.set_yscale("log")  # nginx and the gateway are an order of magnitude or more apart
            ax.tick_params(axis="x", labelsize=8)
            ax.set_ylabel(label if col == 0 else "")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            if row == 0:
                ax.set_title("\n".join(textwrap.wrap(report["profiles"][key]["title"], 36)), fontsize=10)
            notes = [f"{name.replace('gateway', 'gw')} {r[field].get('median', float('nan')):.2f}" for name, r in ratios.get(key, {}).items()]
            if notes:
                text = f"{'req/s' if field == 'rps' else 'CPU µs/req'} ratio: " + ", ".join(notes)
                ax.text(0.5, -0.2, "\n".join(textwrap.wrap(text, 48, break_on_hyphens=False)), transform=ax.transAxes, ha="center", va="top", fontsize=8)
    env, args = report["environment"], report["args"]
    fig.suptitle(
        f"gateway vs direct, nginx, node — {report['started']}, {env['load_tool']} -c{args['connections']} "
        f"{args['seconds']:g}s x {args['rounds']} rounds, upstream {env.get('upstream')}",
        fontsize=11,
    )
    fig.text(0.5, 0.005, "nginx: no JWT, no body checks; node: jose on every request. " + "; ".join(report.get("left_out", [])), ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a benchmarks/results/profiles-*.json")
    parser.add_argument("-o", "--out", type=Path, help="the PNG (default: beside the JSON)")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    made, message = render(report, args.out or args.report.with_suffix(".png"))
    if made is None:
        print(f"chart skipped: {message}", file=sys.stderr)
        sys.exit(0)
    print(made)


if __name__ == "__main__":
    main()
