#!/usr/bin/env python3
"""Prints the `balance` benchmark's results (target/criterion) as a markdown table:
ns per request for each contender and endpoint count, single task and 64 tasks,
then the `floor/*` measurements."""
import json, pathlib, sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
rows = {}
floor = {}
for est in root.glob("*/*/new/estimates.json"):
    group, n = est.parent.parent.parent.name, est.parent.parent.name
    ns = json.loads(est.read_text())["mean"]["point_estimate"]
    if group == "floor":
        floor[n] = ns
        continue
    mode, _, name = group.partition("_")
    rows.setdefault(name, {})[(mode, int(n))] = ns
counts = sorted({n for r in rows.values() for (_, n) in r})
for mode in ("single", "tasks64", "pick"):
    print(f"\n{mode}: ns per request (lower is better)\n")
    print("| contender | " + " | ".join(f"{n} endpoints" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in sorted(rows):
        cells = [rows[name].get((mode, n)) for n in counts]
        if any(c is not None for c in cells):
            print(f"| {name} | " + " | ".join("" if c is None else f"{c:.0f}" for c in cells) + " |")
if floor:
    print("\nfloor: ns per request\n")
    print("| part | ns |")
    print("|---|---|")
    for name in sorted(floor):
        print(f"| {name} | {floor[name]:.0f} |")
