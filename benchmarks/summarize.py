"""Condense ``bench_solver.py`` output into the README's one-line-per-layer table.

    python benchmarks/bench_solver.py > out.txt && python benchmarks/summarize.py out.txt
"""

from __future__ import annotations

import re
import sys

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


if __name__ == "__main__":
    main(sys.argv[1])
