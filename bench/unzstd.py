#!/usr/bin/env python3
"""Decompressing a page stream: what bounding each step costs, in one run.

The target side of a compressed stream decompresses what a peer sent. Decompressed whole, a
1 MiB piece of zeros could expand to 32 GiB at once; `receive.zstd_steps` (the page stream,
pre-copy, post-copy) feeds zstd UNZSTD_STEP compressed bytes at a time instead. This measures
it against the unbounded baseline (one `decompress` per 1 MiB piece, what the page stream did
before) and against `receive.unzstd` (the n-bytes-at-a-time reader on top of it) and
zstandard's stream_reader (the one-way image stream), on CRIU-like pages (runs of
random-ish pages and zero pages), order rotated every repetition. CPU seconds per GiB of
content; writes JSON (default bench/results/unzstd.json).

Pure computation, no root. Run: .venv/bin/python bench/unzstd.py [--size-mib 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

from migrd.engine import receive

RESULTS = Path(__file__).parent / "results"
PIECE = 1 << 20
PAGE = 4096


def pages(size: int, seed: int = 1) -> bytes:
    """Runs of 1-64 pages, alternately zero and word-like (the run prints the ratio zstd gets)."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(2, 9)) for _ in range(2000)]
    pool = [b"".join(rnd.choice(words) for _ in range(800))[:PAGE].ljust(PAGE, b"\0") for _ in range(256)]
    out, zero = bytearray(), False
    while len(out) < size:
        run = rnd.randint(1, 64)
        out += bytes(PAGE * run) if zero else b"".join(rnd.choice(pool) for _ in range(run))
        zero = not zero
    return bytes(out[:size])


def compressed(content: bytes) -> bytes:
    """As a sender on an answered stream makes it: a flushed block per piece (receive.Compressor)."""
    c = receive.Compressor("zstd")
    return b"".join(bytes(c.block(content[i:i + PIECE])) for i in range(0, len(content), PIECE)) + c.end()


def whole(comp: bytes) -> int:
    dobj = zstandard.ZstdDecompressor().decompressobj()
    return sum(len(dobj.decompress(comp[i:i + PIECE])) for i in range(0, len(comp), PIECE))


def steps(comp: bytes) -> int:
    dobj = zstandard.ZstdDecompressor().decompressobj()
    return sum(len(p) for i in range(0, len(comp), PIECE) for p in receive.zstd_steps(dobj, comp[i:i + PIECE]))


def unzstd(comp: bytes) -> int:
    src = io.BytesIO(comp)
    read = receive.unzstd(src.read)
    n = 0
    while data := read(PIECE):
        n += len(data)
    return n


def stream_reader(comp: bytes) -> int:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(comp), read_size=PIECE)
    n = 0
    while data := reader.read(PIECE):
        n += len(data)
    return n


WAYS: dict[str, Callable[[bytes], int]] = {"whole": whole, "steps": steps, "unzstd": unzstd,
                                           "stream_reader": stream_reader}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="content decompressed per run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "unzstd.json")
    a = ap.parse_args()
    content = pages(a.size_mib << 20)
    comp = compressed(content)
    names = list(WAYS)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(a.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t = time.process_time()
            assert WAYS[name](comp) == len(content), name
            cpu[name].append((time.process_time() - t) * (1 << 30) / len(content))
    base = statistics.median(cpu["whole"])
    out = {"what": "CPU seconds per GiB of content, decompressing a page-like zstd stream",
           "content_bytes": len(content), "compressed_bytes": len(comp), "unzstd_step": receive.UNZSTD_STEP,
           "reps": a.reps, "python": platform.python_version(), "zstandard": zstandard.__version__,
           "ways": {n: {"cpu_s_per_gib": v, "median": statistics.median(v),
                        "ratio_to_whole": statistics.median(v) / base} for n, v in cpu.items()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"{len(content) >> 20} MiB of content, {len(content) / len(comp):.2f}:1, {a.reps} reps (CPU s per GiB):")
    for n, v in out["ways"].items():
        print(f"  {n:14} {v['median']:.3f}  x{v['ratio_to_whole']:.2f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
