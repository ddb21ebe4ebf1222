"""Peak RSS of `memcli verify` against corpus size: one fresh process per generated PhoneBook size, on the tiny
model by default (its decode is fast enough for a million entries), and the growth in bytes per added entry
(target: < 200). --no-decode keeps everything but llama.cpp's decode (a stub backend plans and packs the
batches and scores 8-wide zero logits): what verify itself holds per entry, at a million entries in minutes.

    python scripts/verify_memory.py --entries 10000,100000,1000000 [--model tiny] [--lora RUN] [--threads 2]
"""

import argparse
import json
import tempfile
from pathlib import Path

from memcli.bench.verify import measure_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", default="10000,100000,1000000")
    p.add_argument("--model", default="tiny")
    p.add_argument("--lora")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--no-decode", action="store_true",
                   help="replace llama.cpp's decode by a stub: the corpus stream, verdicts and report alone")
    p.add_argument("--out", help="also write the rows as JSON here")
    a = p.parse_args()
    sizes = [int(x) for x in a.entries.split(",")]
    with tempfile.TemporaryDirectory(prefix="memcli-mem-") as tmp:
        rows = measure_memory(sizes, a.lora, a.model, a.threads, a.batch_tokens, Path(tmp), heap=False,
                              decode=not a.no_decode)
    print(f"{'entries':>10} {'peak RSS MB':>12} {'bytes/entry since previous':>27} {'entries/s':>10} {'s':>8}")
    for r in rows:
        growth = f"{r['bytes_per_entry_since']:+.1f}" if "bytes_per_entry_since" in r else "-"
        print(f"{r['entries']:>10,} {r['peak_rss_mb']:>12.1f} {growth:>27} {r['entries_per_s']:>10,.0f} "
              f"{r['seconds']:>8.1f}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        per = (last["peak_rss_mb"] - first["peak_rss_mb"]) * 2**20 / (last["entries"] - first["entries"])
        print(f"growth from {first['entries']:,} to {last['entries']:,} entries: {per:+.1f} bytes per entry "
              f"(target < 200): {'met' if per < 200 else 'MISSED'}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
