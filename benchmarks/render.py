"""Render the benchmark CSV as README tables (never typed by hand).

    python benchmarks/render.py [--csv FILE] [--readme README.md | --stdout] [--plot out.png]

Keeps the newest row per (op, provider, shape, mode, device), writes one table per device between
the README's ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers (printed to stdout when the
markers are missing), and optionally plots the best s2dc backend's speed-up over eager.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import harness

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def newest_by_device(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """{device: the newest row of each (op, provider, shape, mode)}, grouped by op, in CSV order otherwise."""
    newest: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        key = (r["device"], r["op"], r["provider"], r["shape"], r["mode"])
        if key not in newest or r["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = r
    op_order = {op: i for i, op in enumerate(dict.fromkeys(r["op"] for r in rows))}
    by_device: dict[str, list[dict[str, str]]] = {}
    for r in sorted(newest.values(), key=lambda r: op_order[r["op"]]):
        by_device.setdefault(r["device"], []).append(r)
    return by_device


def markdown(by_device: dict[str, list[dict[str, str]]]) -> str:
    sections = []
    for device, rows in by_device.items():
        latest = max(rows, key=lambda r: r["timestamp"])
        versions = latest["versions"].replace(";", ", ")
        caption = f"Median ms per call, fp32 ({versions}; newest run {latest['timestamp'][:10]})."
        sections.append(f"#### {device}\n\n{caption}\n\n{harness.summary_table(rows, markdown=True)}")
        if memory := harness.peak_memory_table(rows, markdown=True):
            cpu = "cpu" in device
            what = "resident set growth, inputs excluded" if cpu else "on the GPU, inputs included"
            sections.append(f"Peak memory in MB ({what}), where measured:\n\n{memory}")
    return "\n\n".join(sections)


def plot(by_device: dict[str, list[dict[str, str]]], path: Path) -> None:
    """Horizontal bars, a panel per device: the best s2dc backend's speed-up over eager per case (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {d: harness.pivot(rows) for d, rows in by_device.items()}
    panels = {
        d: {k: b for k, m in cases.items() if (b := harness.best_ours(m))} for d, cases in panels.items()
    }
    heights = [1 + 0.3 * len(cases) for cases in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)), squeeze=False, height_ratios=heights)
    for ax, (device, cases) in zip(axes[:, 0], panels.items(), strict=True):
        labels = [f"{op} {shape} {mode} ({best[0]})" for (op, shape, mode), best in cases.items()]
        ax.barh(range(len(cases)), [best[1] for best in cases.values()], color="tab:blue")
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(cases)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("best s2dc backend: speed-up over eager")
        ax.set_title(device)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=harness.RESULTS_CSV)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--stdout", action="store_true", help="print the tables, leave the README alone")
    parser.add_argument("--plot", type=Path, help="also write a bar chart of speed-ups (matplotlib)")
    args = parser.parse_args()
    by_device = newest_by_device(harness.read_rows(args.csv))
    tables = markdown(by_device)
    text = "" if args.stdout or not args.readme.exists() else args.readme.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        args.readme.write_text(f"{head}{BEGIN}\n{tables}\n{END}{rest.split(END, 1)[1]}")
        print(f"updated {args.readme}", file=sys.stderr)
    else:
        print(tables)
    if args.plot:
        plot(by_device, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
