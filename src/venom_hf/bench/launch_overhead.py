"""Host time of one eager call: ``VNMSparseLinear`` (cached launch plan), the bare ``venom::spmm`` op,
``nn.Linear`` and ``F.linear`` on the same layer, back to back, 1 token.

On a small layer the GPU work is a few microseconds, so the time per call of many back-to-back calls is
the host's: what an eager ``generate()`` pays per projection. Prints a table, writes JSON.

    python -m venom_hf.bench.launch_overhead --out out/launch
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def _per_call_us(fn, x, calls: int) -> float:
    for _ in range(20):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(shapes, dtypes, calls: int, spec: str = "64:2:8", repeats: int = 3) -> list[dict]:
    from venom_hf import VNMSparseLinear, spmm

    rows = []
    for R, K in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            lin = nn.Linear(K, R, dtype=dtype, device="cuda")
            sparse = VNMSparseLinear.from_linear(lin, spec)
            v, m = sparse.spec.v, sparse.spec.m
            x = torch.randn(1, K, dtype=dtype, device="cuda")
            w, b = lin.weight.detach(), lin.bias.detach()
            fns = {
                "F.linear": lambda t: F.linear(t, w, b),
                "nn.Linear": lin,
                "VNMSparseLinear": sparse,
                "venom::spmm op": lambda t: spmm(t, sparse.weight_values, sparse.weight_columns, sparse.weight_meta,
                                                 sparse.bias, v, m, R),
            }
            with torch.no_grad():
                us = {name: min(_per_call_us(fn, x, calls) for _ in range(repeats)) for name, fn in fns.items()}
            rows.append({"layer": f"{R}x{K}", "dtype": str(dtype).removeprefix("torch."), "spec": spec, "us": us,
                         "sparse_over_F_linear": us["VNMSparseLinear"] / us["F.linear"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["256x256", "4096x4096"], help="OUTxIN layer shapes")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--spec", default="64:2:8")
    ap.add_argument("--out", default="out/launch")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_overhead needs a CUDA GPU")
    shapes = [tuple(int(s) for s in sh.split("x")) for sh in args.shapes]
    rows = measure(shapes, [torch.float16, torch.bfloat16], args.calls, args.spec)
    card = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "launch_overhead.json"), "w") as f:
        json.dump({"card": card, "torch": torch.__version__, "calls": args.calls, "rows": rows}, f, indent=1)
    names = list(rows[0]["us"])
    print(f"host time per 1-token call, {args.calls} back-to-back calls, {card} (us)")
    print("| layer | dtype | " + " | ".join(names) + " | VNMSparseLinear / F.linear |")
    print("|---" * (len(names) + 3) + "|")
    for r in rows:
        print(f"| {r['layer']} | {r['dtype']} | " + " | ".join(f"{r['us'][n]:.1f}" for n in names)
              + f" | {r['sparse_over_F_linear']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
