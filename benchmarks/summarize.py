"""Condense ``bench_solver.py`` output into the README's one-line-per-layer table.

    python benchmarks/bench_solver.py > out.txt && python benchmarks/summarize.py out.txt
    python benchmarks/bench_solver.py --peers strong ... > out.txt && python benchmarks/summarize.py --strong out.txt
    python benchmarks/summarize.py --strong w4.txt w3_w2.txt    # several runs' tables as one
"""

from __future__ import annotations

import argparse
import re

HEADER = re.compile(r"^### (?P<layer>.+), W(?P<bits>\d)  \(")
ROWS = {
    "gptq": "GPTQ act-order (",
    "reference": "COMQ reference code",
    "default": "+ scale search = hf_comq default",
}


def parse(lines: list[str]) -> list[dict]:
    """One record per (layer, bits) table: objective / RTN of GPTQ act-order, the
    reference-code setting and hf_comq's default."""
    records: list[dict] = []
    for line in lines:
        match = HEADER.match(line)
        if match:
            records.append({"layer": match["layer"], "bits": int(match["bits"])})
            continue
        if not records or not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip("|\n").split("|")]
        for key, prefix in ROWS.items():
            if cells[0].startswith(prefix) or cells[0].lstrip().startswith(prefix):
                records[-1][key] = float(cells[1])
    return [r for r in records if all(key in r for key in ROWS)]


STRONG_HEADER = re.compile(r"^### (?P<layer>.+), W(?P<bits>\d), group (?P<group>\w+)  \(")


def parse_strong(lines: list[str]) -> list[dict]:
    """One record per (layer, bits) table of ``--peers strong``: every row's objective
    as a ratio to GPTQ-best, and which GPTQ setting was best."""
    records: list[dict] = []
    for line in lines:
        match = STRONG_HEADER.match(line)
        if match:
            records.append({"layer": match["layer"], "bits": int(match["bits"]), "rows": {}})
        elif records and line.startswith("GPTQ-best: "):
            records[-1]["best"] = line.removeprefix("GPTQ-best: GPTQ act-order, ").strip()
        elif records and line.startswith("| ") and not line.startswith(("| setting", "|---")):
            cells = [cell.strip() for cell in line.strip("|\n").split("|")]
            records[-1]["rows"][cells[0]] = (float(cells[1]), float(cells[2]))
    return [r for r in records if "hf_comq default" in r["rows"]]


STRONG_COLUMNS = (
    ("COMQ reference code", lambda name: name.startswith("COMQ reference code")),
    ("diag(H) clipping default", lambda name: "clip_weights='diagonal'" in name),
    ("default with start_grids=1", lambda name: name == "hf_comq default with start_grids=1"),
    ("previous default (no block re-solve)", lambda name: "block_resolve=False" in name),
    ("with pair moves (pair_moves=32)", lambda name: "pair_moves=32" in name),
    ("without pair moves (pair_moves=0)", lambda name: "pair_moves=0" in name),
    ("with the scale refit (scale_refit=True)", lambda name: "scale_refit=True" in name),
    ("hf_comq default", lambda name: name == "hf_comq default"),
)
"""Columns of the ``--strong`` table: the COMQ settings' rows, found by name; a column
appears when some table of the files has that row (older runs lack the newer settings).
"hf_comq default" is the default of the run's commit: without pair moves until they
became the default, with them since; with the scale refit at every bit width until it
ran at 2 bits only."""


def _strong_value(rows: dict, matches) -> float:
    return next((value[1] for name, value in rows.items() if matches(name)), float("nan"))


def main_strong(paths: list[str]) -> None:
    records = []
    for path in paths:
        with open(path) as handle:
            records += parse_strong(handle.readlines())
    columns = [(label, matches) for label, matches in STRONG_COLUMNS
               if any(any(matches(name) for name in r["rows"]) for r in records)]
    print("| layer | bits | GPTQ-best (observer, damp) | GPTQ-best / RTN | "
          + " | ".join(f"{label} / GPTQ-best" for label, _ in columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for r in records:
        rows = r["rows"]
        cells = [f"{_strong_value(rows, matches):.3f}" for _, matches in columns]
        cells[-1] = f"**{cells[-1]}**"
        print(f"| {r['layer']} | W{r['bits']} | {r['best']} | {1.0 / rows['RTN (min-max grid)'][1]:.3f} | "
              + " | ".join(cells) + " |")
    for label, matches in [c for c in columns if c[0] != "COMQ reference code"]:
        ratios = sorted(_strong_value(r["rows"], matches) for r in records)
        print(f"\n{label} / GPTQ-best over {len(ratios)} layer-bit pairs: worst {ratios[-1]:.3f}, "
              f"median {ratios[len(ratios) // 2]:.3f}, at most 0.9 in {sum(x <= 0.9 for x in ratios)}")


def main(path: str) -> None:
    with open(path) as handle:
        records = parse(handle.readlines())
    print("| layer | bits | GPTQ act-order / RTN | COMQ reference code / RTN | hf_comq default / RTN | default / GPTQ act-order |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['layer']} | W{r['bits']} | {r['gptq']:.3f} | {r['reference']:.3f} | {r['default']:.3f} "
            f"| **{r['default'] / r['gptq']:.3f}** |"
        )
    worst = max(r["default"] / r["gptq"] for r in records)
    print(f"\nworst default / GPTQ act-order over {len(records)} layer-bit pairs: {worst:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strong", action="store_true", help="tables of bench_solver.py --peers strong (several files: one table)")
    parser.add_argument("files", nargs="+", help="bench_solver.py output files")
    args = parser.parse_args(argv)
    if not args.strong and len(args.files) > 1:
        parser.error("several files make one table with --strong only; without it, pass one file")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.strong:
        main_strong(arguments.files)
    else:
        main(arguments.files[0])
