"""Run every benchmark script with the same flags and print one combined table.

    python benchmarks/run.py --quick                      # a fresh CPU machine, under a minute
    python benchmarks/run.py                              # docs/anchors.md's CPU rows
    python benchmarks/run.py --gpu --csv out/results.csv  # docs/anchors.md's GPU rows

Flags are those of each script (see ``harness.parse_args``); rows are appended to one CSV.
"""

from __future__ import annotations

import bench_similarity
import bench_sinkhorn
import bench_train
import harness

SCRIPTS = {
    "bench_sinkhorn": bench_sinkhorn.make_cases,
    "bench_similarity": bench_similarity.make_cases,
    "bench_train": bench_train.make_cases,
}


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    rows = []
    for name, make_cases in SCRIPTS.items():
        rows += harness.run_script(name, make_cases, args)
    print(f"\nAll benchmarks, median ms ({harness.versions()}); rows appended to {args.csv}")
    print(harness.summary_table(rows))
    return rows


if __name__ == "__main__":
    main()
