"""Markdown tables from a pytest-benchmark JSON file (the README's speed tables).

    pytest --benchmark --benchmark-json=bench.json
    python tools/bench_table.py bench.json

Rates come from each result's extra_info (seq_per_s or img_per_s: N / best round);
ratios are to the group's baseline (the seed's Python greedy decoder, or the eager model)."""
import json
import re
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    m = data["machine_info"]
    print(f"Machine: {m.get('cpu', {}).get('brand_raw', m.get('processor_name'))}, {m.get('threads')} threads, "
          f"torch {m.get('torch')}, GPU {m.get('gpu')}\n")
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    for group, rows in sorted(groups.items()):
        unit = "seq/s" if "seq_per_s" in rows[0]["extra_info"] else "img/s"
        key = "seq_per_s" if unit == "seq/s" else "img_per_s"
        base = [r for r in rows if "seed loop" in r["name"] or "eager_python" in r["name"]]
        base_rate = base[0]["extra_info"][key] if base else None
        print(f"| {group} | {unit} | vs baseline |\n|---|---:|---:|")
        for r in sorted(rows, key=lambda r: r["extra_info"][key]):
            peer = re.match(r"test_peer_(\w+)\[(\d+)\]", r["name"])
            name = f"{peer.group(1)} (peer) beam={peer.group(2)}" if peer else re.sub(r"^test_\w+?\[|\]$", "", r["name"])
            rate = r["extra_info"][key]
            ratio = f"{rate / base_rate:.1f}x" if base_rate else ""
            print(f"| {name} | {rate:,.0f} | {ratio} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
