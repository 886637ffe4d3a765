"""Markdown tables from a pytest-benchmark JSON file.

    pytest --benchmark benchmarks/bench_decode.py --benchmark-json=b.json
    python tools/bench_table.py b.json

Rates come from each result's extra_info (seq_per_s or img_per_s: N / best round), names
from extra_info["row"]. Decoding groups get two ratio columns: to (c), the fastest pure-Python
greedy decoder, and to (a), the seed's decoder (test ids c_fastest_python and a_seed); model
groups one, to the eager baseline (a). The README's headline decoding table comes from
benchmarks/decode_table.py instead (rows interleaved in one process)."""
import json
import sys
from collections import defaultdict


def _rate(result) -> float:
    info = result["extra_info"]
    return info.get("seq_per_s", info.get("img_per_s"))


def _find(rows, marker):
    hits = [r for r in rows if marker in r["name"]]
    return _rate(hits[0]) if hits else None


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
        if unit == "seq/s":
            bases = [("vs (c)", _find(rows, "[c_fastest_python")), ("vs (a)", _find(rows, "[a_seed"))]
        else:
            bases = [("vs (a)", _find(rows, "eager"))]
        bases = [(title, rate) for title, rate in bases if rate]
        print(f"| {group} | {unit} |" + "".join(f" {t} |" for t, _ in bases))
        print("|---|---:|" + "---:|" * len(bases))
        for r in sorted(rows, key=_rate):
            name = r["extra_info"].get("row", r["name"])
            print(f"| {name} | {_rate(r):,.0f} |" + "".join(f" {_rate(r) / b:.2f}x |" for _, b in bases))
        print()


if __name__ == "__main__":
    main(sys.argv[1])
