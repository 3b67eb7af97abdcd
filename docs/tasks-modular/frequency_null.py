"""Is 2*pi/5 special to the spectral heads of the modular runs? For every spectral head, the
distance on the circle from its closest frequency pair to the nearest k*2*pi/p (k = 1..p-1), for
the modulus the task used (p = 5) and, as a null, for moduli it did not use.

    python docs/tasks-modular/frequency_null.py
"""
import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).parent
LEARNED = ["bifocal-s1234", "bifocal-s1235", "bifocal-s1236", "spectral-s1234", "spectral-s1235"]


def distance(omega: float, p: int) -> float:
    return min(abs((omega - 2 * math.pi * k / p + math.pi) % (2 * math.pi) - math.pi) for k in range(1, p))


def head_distances(runs: list[str], p: int) -> list[float]:
    out = []
    for run in runs:
        for head in json.loads((HERE / "spectrum" / f"{run}.json").read_text())["spectral_heads"]:
            out.append(min(distance(w, p) for w in head["omega"]))
    return out


print("| modulus p | targets k*2pi/p | median distance | heads within 0.05 | heads closer than at init (init distance) |")
print("|---:|---:|---:|---:|---:|")
for p in (3, 4, 5, 6, 7, 8):
    d = head_distances(LEARNED, p)
    init = min(distance(10000 ** (-i / 8), p) for i in range(8))
    print(f"| {p}{' (the task)' if p == 5 else ''} | {p - 1} | {statistics.median(d):.3f} | {sum(x < 0.05 for x in d)} of {len(d)} "
          f"| {sum(x < init for x in d)} of {len(d)} ({init:.3f}) |")
