"""The hottest SASS lines of an Nsight Compute source page, and the stall samples per opcode.

Usage (bench/device_check.sh's `profile` stage):
    ncu --import report.ncu-rep --page source --print-source sass --csv > report.csv
    python bench/ncu_hot_lines.py report.csv --top 60

The CSV's sample column is found by name (``Warp Stall Sampling (All Samples)`` in current releases; any column
naming stall sampling otherwise). Where the file has no such table (an older ncu, a failed import), its first
lines are printed as they are, so the output never hides what the profiler said.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _sample_column(header: list[str]) -> int | None:
    for pattern in (r"stall sampling \(all", r"stall sampling", r"sampling"):
        for i, name in enumerate(header):
            if re.search(pattern, name, re.IGNORECASE):
                return i
    return None


def hot_lines(rows: list[list[str]], top: int) -> list[str] | None:
    """The report's lines, or None where no sample table is found."""
    for h, header in enumerate(rows):
        col = _sample_column(header)
        src = next((i for i, name in enumerate(header) if name.strip().lower() == "source"), None)
        if col is None or src is None:
            continue
        addr = next((i for i, name in enumerate(header) if name.strip().lower() == "address"), None)
        body = [r for r in rows[h + 1:] if len(r) > max(col, src)]
        total = sum(_number(r[col]) for r in body)
        if total <= 0:
            return [f"no stall samples in column {header[col]!r} ({len(body)} lines)"]
        by_op: dict[str, float] = defaultdict(float)
        for r in body:
            words = [w for w in r[src].split() if not w.startswith("@")]
            by_op[words[0].split(".")[0] if words else "?"] += _number(r[col])
        out = [f"{len(body)} SASS lines, {total:,.0f} samples ({header[col]})", "", "samples by opcode:"]
        for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])[:25]:
            out.append(f"  {n / total:7.2%}  {op}")
        out += ["", f"the {top} hottest lines (share, address, SASS):"]
        for r in sorted(body, key=lambda r: -_number(r[col]))[:top]:
            where = r[addr] if addr is not None and addr < len(r) else ""
            out.append(f"  {_number(r[col]) / total:7.2%}  {where:>8}  {r[src].strip()}")
        return out
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    ap.add_argument("--top", type=int, default=60, help="hottest lines to list (default 60)")
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error(f"--top {args.top}: expected a positive count")
    try:
        with open(args.csv, newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        print(f"ncu_hot_lines: cannot read {args.csv}: {e.strerror}", file=sys.stderr)
        return 1
    lines = hot_lines(rows, args.top)
    if lines is None:
        lines = ["no stall-sampling table found; the file begins:"] + [",".join(r) for r in rows[:40]]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
