"""Small self-contained programs that migrd's demo and benchmarks run as workloads.

Each is Python source run with `python -c`; the marker in its first line lets a cleanup check
that a PID still runs one of ours before ending it.
"""

from __future__ import annotations

MARK = "migrd-workload"

#: Counts in memory and appends each value to the file named by argv[1], reopening it for every
#: write so CRIU never sees a growing open file. A restored copy goes on from the dumped value.
#: With argv[2] == "child" it forks once and the child counts into "<file>.child".
COUNTER = f"""
import os, sys, time  # {MARK}
path = sys.argv[1]
if sys.argv[2:] == ["child"] and os.fork() == 0:
    path += ".child"
n = 0
deadline = time.time() + 3600  # never outlive its purpose by much
while time.time() < deadline:
    n += 1
    with open(path, "a") as f:
        f.write(f"{{n}}\\n")
    time.sleep(0.05)
"""


#: CPU-bound: spins, appending a counter every 0.1 s (reopening the file), and ends by itself
#: at the absolute time argv[2].
BUSY = f"""
import sys, time  # {MARK}
path, deadline = sys.argv[1], float(sys.argv[2])
n, t = 0, 0.0
while time.time() < deadline:
    if time.time() - t >= 0.1:
        n += 1
        with open(path, "a") as f:
            f.write(f"{{n}}\\n")
        t = time.time()
"""


#: Rewrites argv[2] KiB/s of its argv[1] MiB of memory, sweeping through it (a page is
#: rewritten again only after size/rate seconds), one stripe every 10 ms, after touching all of
#: it once; prints "ready" then. Its dirty rate over any window shorter than size/rate is
#: argv[2] KiB/s. Ends by itself after an hour.
SWEEPER = f"""
import sys, time  # {MARK}
size, per_s = int(sys.argv[1]) << 20, int(sys.argv[2]) << 10
buf = bytearray(size)
buf[:] = b"\\1" * size
stripe, at, n = per_s // 100, 0, 0
print("ready", flush=True)
start = time.monotonic()
while time.monotonic() < start + 3600:
    n += 1
    buf[at:at + stripe] = bytes([n % 251 + 1]) * stripe
    at = (at + stripe) % size
    time.sleep(max(0.0, start + n / 100 - time.monotonic()))
"""


def read_counts(path) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []
