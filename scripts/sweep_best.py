"""Condense `benchmarks/spmm.py --sweep` lines (stdin): per case the best config of each kernel family
and the overall best, with its ratio to cuBLAS."""
import re
import sys
from collections import defaultdict

pat = re.compile(r"sweep (\S+) T=(\d+) (\S+) (\S+)\s+([\d.]+) us\s+dense\s+([\d.]+)\s+x([\d.]+) err (\S+)")
cases = defaultdict(list)
for line in sys.stdin:
    m = pat.match(line.strip())
    if m:
        shape, T, spec, cfg, us, dense, _, err = m.groups()
        cases[(shape, int(T), spec)].append((float(us), cfg, float(dense), float(err)))
for (shape, T, spec), runs in cases.items():
    fam = {}
    for us, cfg, dense, err in sorted(runs):
        fam.setdefault(cfg.split("_")[0].split("@")[0], (us, cfg))
    dense = runs[0][2]
    worst_err = max(r[3] for r in runs)
    best = min(runs)
    parts = "  ".join(f"{f}:{u:.1f}({c})" for f, (u, c) in fam.items())
    print(f"{shape:>10s} T={T:<3d} {spec:8s} cuBLAS {dense:6.1f} | best {best[1]} {best[0]:.1f} us x{dense / best[0]:.2f} "
          f"| {parts} | max err {worst_err:.1e}")
