"""Benchmark: Spatha V:2:M SpMM (venom_hf.kernels.spmm) vs cuBLAS dense F.linear vs cuSPARSELt 2:4.

All three are timed in the same run with CUDA-graph replay (20 calls per graph, median of 15 replays),
and every Spatha case is checked against a float64 reference before it is timed. Writes
``spmm.json``, ``spmm.md`` (tables) and ``spmm.png`` (plot) into --out. ``--cold`` rotates copies of every
weight so that each call streams it from HBM, as in a model (the tables of docs/benchmarks.md).
``--sweep`` first times every tile config on a set of cases (the measurements behind the dispatch).

    python -m venom_hf.bench.spmm --out out/ [--quick] [--cold] [--sweep]    # or: venom-hf bench kernel ...
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from venom_hf import format as vf
from venom_hf import kernels
from venom_hf.kernels import configs, ops

SHAPES = {
    "bert.qkvo 768x768": (768, 768),
    "bert.up 3072x768": (3072, 768),
    "bert.down 768x3072": (768, 3072),
    "llama7b.qkvo 4096x4096": (4096, 4096),
    "llama7b.up 11008x4096": (11008, 4096),
    "llama7b.down 4096x11008": (4096, 11008),
    "smollm2.qo 576x576": (576, 576),
    "smollm2.kv 192x576": (192, 576),
    "smollm2.up 1536x576": (1536, 576),
    "smollm2.down 576x1536": (576, 1536),
}
TOKENS = [1, 16, 128, 512, 2048, 8192]
DEV = torch.device("cuda")


def random_vnm_mask(R, K, v, m, gen):
    rb, g = math.ceil(R / v), math.ceil(K / m)
    cols = torch.rand(rb, g, m, generator=gen, device=DEV).topk(4, -1).indices
    pick = torch.rand(rb, v, g, 4, generator=gen, device=DEV).topk(2, -1).indices
    absolute = cols[:, None].expand(rb, v, g, 4).gather(-1, pick) + torch.arange(g, device=DEV)[:, None] * m
    mask = torch.zeros(rb * v, g * m, dtype=torch.bool, device=DEV)
    mask.scatter_(1, absolute.reshape(rb * v, -1), True)
    return mask[:R, :K].contiguous()


def time_graph(fn, inner=20, reps=15) -> float:
    """Median microseconds per call, CUDA-graph replay of ``inner`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # every weight copy of a ``cold`` callable runs once before the capture: what a layer derives from
        # its weight on first use (a launch plan, the sm_90a chunk layout) cannot be built inside a capture
        for _ in range(max(2, getattr(fn, "copies", 1) + 1)):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / inner)
    del g
    return statistics.median(ts)


L2_BYTES = 50 * 2**20  # H100 L2; main() reads the card's own size when torch reports it


def cold(make_call, tensors, copies_for_bytes, copy=lambda t: t.clone()):
    """A callable for time_graph that runs ``make_call(*copy)`` on copies of ``tensors`` in turn, with enough
    copies that their bytes are twice the L2 (``--cold``): every call streams its weights from HBM, as in a
    model, where a layer's weights are long evicted by the other layers when it runs again. Without it, 20
    calls of one layer whose weights fit the 50 MB L2 read them from L2 (flatters small and sparse weights).
    ``copy`` makes one copy of a tensor (cuSPARSELt tensors are re-compressed, not cloned)."""
    n = max(1, min(20, math.ceil(2 * L2_BYTES / max(1, copies_for_bytes))))
    sets = [tuple(tensors)] + [tuple(copy(t) for t in tensors) for _ in range(n - 1)]
    state = {"i": 0}

    def call():
        args = sets[state["i"] % n]
        state["i"] += 1
        return make_call(*args)

    call.copies = n
    return call


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def to_sparse_24(w24):
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w24)


def sparse24(w):
    """A 2:4 version of w (keep the 2 largest of every 4) and its cuSPARSELt tensor (or None)."""
    from torch.sparse import SparseSemiStructuredTensor

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    R, K = w.shape
    g = w.view(R, K // 4, 4)
    idx = g.abs().topk(2, -1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).view(R, K)
    w24 = torch.where(mask, w, torch.zeros_like(w))
    try:
        return w24, to_sparse_24(w24)
    except Exception as e:  # shape not supported
        print(f"  cuSPARSELt: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        return w24, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="fp16 only, fewer specs")
    ap.add_argument("--dtype", default="all", choices=["all", "fp16", "bf16"],
                    help="restrict the full plan to one dtype (fp16: 4 specs, bf16: 64:2:8 and 64:2:16)")
    ap.add_argument("--sweep", action="store_true", help="time every tile config on a few cases first")
    ap.add_argument("--sweep-set", default="all", choices=["all", "decode", "prefill", "tall8"])
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    ap.add_argument("--sweep-configs", default="", help="comma-separated substrings of the config names to sweep")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape names")
    ap.add_argument("--tokens", default="", help="comma-separated token counts")
    ap.add_argument("--cold", action="store_true",
                    help="rotate copies of each weight (2x the L2 in all) so calls read weights from HBM")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kernels.require_available()
    global L2_BYTES
    props = torch.cuda.get_device_properties(0)
    nsm, smem = props.multi_processor_count, int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    tma = ops.device_has_tma(torch.cuda.current_device())
    wg = ops.device_has_wgmma(torch.cuda.current_device())
    L2_BYTES = int(getattr(props, "L2_cache_size", 0) or L2_BYTES)
    card = torch.cuda.get_device_name()
    print(f"card: {card}, torch {torch.__version__}, SMs {nsm}, L2 {L2_BYTES / 2**20:.0f} MB")
    gen = torch.Generator(device=DEV).manual_seed(0)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS
    shapes = {k: v for k, v in SHAPES.items() if not args.shapes or any(s in k for s in args.shapes.split(","))}
    if args.quick:
        plan = [(torch.float16, ["64:2:8", "64:2:16", "64:2:32", "128:2:8"])]
    else:
        plan = [
            (torch.float16, ["64:2:8", "64:2:16", "64:2:32", "128:2:8"]),
            (torch.bfloat16, ["64:2:8", "64:2:16"]),
        ]
        if args.dtype != "all":
            plan = [p for p in plan if p[0] == {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]]
    rows = []
    sweep = []
    default_cps, default_ring, default_tma = ops.STREAM_CTAS_PER_SM, ops.RING_CTAS_PER_SM, ops.TMA_CTAS_PER_SM
    if args.sweep:
        cases = [((4096, 4096), 2048, "64:2:8"), ((4096, 4096), 2048, "64:2:16"), ((11008, 4096), 2048, "64:2:8"),
                 ((4096, 4096), 2048, "128:2:8"), ((4096, 4096), 8192, "64:2:8"), ((4096, 4096), 512, "64:2:8"),
                 ((4096, 4096), 128, "64:2:8"), ((11008, 4096), 64, "64:2:8"), ((768, 768), 128, "64:2:8"),
                 ((768, 768), 2048, "64:2:8"), ((768, 3072), 512, "64:2:8"), ((3072, 768), 512, "64:2:16"),
                 ((11008, 4096), 16, "64:2:8"), ((4096, 4096), 1, "64:2:8"), ((768, 768), 16, "64:2:8")]
        decode = [((R, K), T, spec) for (R, K) in ((4096, 4096), (11008, 4096), (4096, 11008))
                  for T in (1, 16) for spec in ("64:2:8", "64:2:16")]
        decode += [((768, 768), 16, "64:2:8"), ((3072, 768), 16, "64:2:8"), ((576, 576), 1, "64:2:8"),
                   ((4096, 4096), 8, "128:2:8"), ((4096, 4096), 16, "64:2:32"), ((4096, 4096), 8, "64:2:8"),
                   ((12288, 4096), 1, "64:2:8"), ((22016, 4096), 1, "64:2:8"), ((1536, 576), 1, "64:2:8"),
                   ((576, 1536), 1, "64:2:8")]
        if args.sweep_set == "decode":
            cases = decode
        elif args.sweep_set == "tall8":  # 3-8 tokens on tall layers (Llama-7B, fused q|k|v and gate|up)
            cases = [((R, K), T, spec) for (R, K) in ((4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096),
                                                      (22016, 4096)) for T in (4, 8) for spec in ("64:2:8", "64:2:16")]
        elif args.sweep_set == "all":
            cases = cases + [c for c in decode if c not in cases]
        else:
            cases = [c for c in cases if c[1] > 16]
        for (R, K), T, spec in cases:
            s = vf.VNMSpec.parse(spec)
            w = torch.randn(R, K, device=DEV, generator=gen).half()
            p = vf.pack(w, s, mask=random_vnm_mask(R, K, s.v, s.m, gen))
            x = torch.randn(T, K, device=DEV, generator=gen).half()
            if args.cold:
                dense_us = time_graph(cold(lambda w_: F.linear(x, w_), [w], nbytes(w)))
            else:
                dense_us = time_graph(lambda: F.linear(x, w))
            wd = vf.unpack(p).double()
            if T > 16:
                tr_us = time_graph(lambda: ops.transpose_kmajor(x))
                print(f"sweep {R}x{K} T={T} transpose alone {tr_us:8.1f} us")
                sweep.append(dict(R=R, K=K, T=T, spec=spec, config="transpose-only", us=tr_us, dense_us=dense_us))
            for c in configs.CONFIGS:
                if c.kernel != "wg" and s.v % (c.bm if c.kernel == "kt" else c.wm):
                    continue
                if args.sweep_configs and not any(f in c.name for f in args.sweep_configs.split(",")):
                    continue
                if T > 16 and not (c.kernel in ("kt", "wg") or c.name in ("large64", "huge64", "large32")):
                    continue
                if ops.choose_config(T, p.values.shape[0], p.values.shape[1], s.v, s.m, nsm, smem,
                                     c.name, tma, wg)[0].name != c.name:
                    continue  # the config declines this case (the search would fall back): no mislabelled row
                if T <= 16 and not (c.decode and T <= c.bn or c.name == "decode16x8"):
                    continue
                cps_grid = {"stream": (1.0, 2.0, 4.0), "ring": (0.25, 1.0, 3.0),
                            "tma": (1.0, 2.0, 4.0)}.get(c.kernel, (None,))
                for cps in cps_grid:
                    if cps is not None:  # the global split-K knob of the decode kernels
                        ops.STREAM_CTAS_PER_SM = ops.RING_CTAS_PER_SM = ops.TMA_CTAS_PER_SM = cps
                    fn = lambda c=c: ops._spmm_cuda(x, p.values, p.columns, p.meta, None, s.v, s.m, R,  # noqa: E731
                                                    config=c.name)
                    y = fn()
                    if args.cold:
                        fn = cold(lambda v_, c_, m_, c=c: ops._spmm_cuda(x, v_, c_, m_, None, s.v, s.m, R, config=c.name),
                                  [p.values, p.columns, p.meta], nbytes(p.values, p.columns, p.meta))
                    err = ((y.double() - x.double() @ wd.T).norm() / (x.double() @ wd.T).norm()).item()
                    us = time_graph(fn)
                    split = ops.choose_config(T, p.values.shape[0], p.values.shape[1], s.v, s.m, nsm, smem, c.name,
                                              tma, wg)[2]
                    label = c.name + (f"@{cps:g}/s{split}" if cps is not None else "")
                    wbytes = sum(t.numel() * t.element_size() for t in (p.values, p.columns, p.meta))
                    sweep.append(dict(R=R, K=K, T=T, spec=spec, config=label, us=us, dense_us=dense_us, rel_err=err,
                                      weight_tbps=wbytes / us / 1e6))
                    print(f"sweep {R}x{K} T={T} {spec} {label:18s} {us:8.1f} us  dense {dense_us:8.1f}  "
                          f"x{dense_us/us:.2f} err {err:.1e} weights {wbytes / us / 1e6:.2f} TB/s")
                ops.STREAM_CTAS_PER_SM, ops.RING_CTAS_PER_SM, ops.TMA_CTAS_PER_SM = default_cps, default_ring, default_tma
    if sweep:
        summary = sweep_summary(sweep)
        (out / "sweep.md").write_text(summary)
        print(summary)
    if args.sweep_only:
        (out / "sweep.json").write_text(json.dumps(dict(card=card, torch=torch.__version__, cold=args.cold, sweep=sweep), indent=1))
        return
    t0 = time.time()
    for dtype, specs in plan:
        for name, (R, K) in shapes.items():
            w = (torch.randn(R, K, device=DEV, generator=gen) / math.sqrt(K)).to(dtype)
            w24, w24s = sparse24(w)
            packed = {}
            for spec in specs:
                s = vf.VNMSpec.parse(spec)
                p = vf.pack(w, s, mask=random_vnm_mask(R, K, s.v, s.m, gen))
                packed[spec] = (s, p, vf.unpack(p).double())
            for T in tokens:
                x = torch.randn(T, K, device=DEV, generator=gen).to(dtype)
                if args.cold:
                    dense_us = time_graph(cold(lambda w_: F.linear(x, w_), [w], nbytes(w)))
                else:
                    dense_us = time_graph(lambda: F.linear(x, w))
                cusparselt_us = None
                if w24s is not None:
                    try:
                        y24 = F.linear(x, w24s)
                        e24 = ((y24.double() - x.double() @ w24.double().T).norm() / (x.double() @ w24.double().T).norm()).item()
                        if e24 < 2e-2:
                            if args.cold:  # the compressed 2:4 tensor is half the dense bytes + metadata
                                cusparselt_us = time_graph(cold(lambda w_: F.linear(x, w_), [w24s], nbytes(w) * 9 // 16,
                                                                copy=lambda _: to_sparse_24(w24)))
                            else:
                                cusparselt_us = time_graph(lambda: F.linear(x, w24s))
                    except Exception as e:
                        print(f"  cuSPARSELt failed {name} T={T}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
                for spec, (s, p, wd) in packed.items():
                    y = kernels.spmm(x, p.values, p.columns, p.meta, None, s.v, s.m, R)
                    ref = x.double() @ wd.T
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(y).all()) and err < (4e-3 if dtype == torch.float16 else 2e-2)
                    if not ok:
                        us = None
                    elif args.cold:
                        us = time_graph(cold(lambda v_, c_, m_: kernels.spmm(x, v_, c_, m_, None, s.v, s.m, R),
                                             [p.values, p.columns, p.meta], nbytes(p.values, p.columns, p.meta)))
                    else:
                        us = time_graph(lambda: kernels.spmm(x, p.values, p.columns, p.meta, None, s.v, s.m, R))
                    cfg, kw, split, _ = ops.choose_config(T, p.values.shape[0], p.values.shape[1], s.v, s.m, nsm, smem,
                                                          None, tma, wg)
                    wbytes = sum(t.numel() * t.element_size() for t in (p.values, p.columns, p.meta))
                    xbytes = T * K * x.element_size() + T * R * x.element_size()
                    row = dict(
                        card=card, dtype=str(dtype)[6:], layer=name, R=R, K=K, T=T, spec=spec, ok=ok, rel_err=err,
                        spatha_us=us, dense_us=dense_us, cusparselt_us=cusparselt_us,
                        x_dense=(dense_us / us) if us else None,
                        x_cusparselt=(cusparselt_us / us) if (us and cusparselt_us) else None,
                        config=f"{cfg.name}/kw{kw}" if cfg else None, split=split,
                        spatha_gbps=((wbytes + xbytes) / us / 1e3) if us else None,
                        spatha_dense_equiv_tflops=(2 * T * R * K / us / 1e6) if us else None,
                    )
                    rows.append(row)
                    print(
                        f"{row['dtype']:8s} {name:26s} T={T:5d} {spec:8s} ok={ok} err={err:.1e} "
                        f"spatha {us or float('nan'):8.1f}us dense {dense_us:8.1f}us "
                        f"2:4 {cusparselt_us or float('nan'):8.1f}us  x{row['x_dense'] or 0:.2f} [{row['config']}/{split}]",
                        flush=True,
                    )
    print(f"benchmark took {time.time() - t0:.0f} s")
    (out / "spmm.json").write_text(json.dumps(dict(card=card, torch=torch.__version__, cold=args.cold, rows=rows, sweep=sweep), indent=1))
    md = tables(rows, card)
    (out / "spmm.md").write_text(md)
    print(md)
    try:
        plot(rows, out / "spmm.png", card)
    except Exception as e:
        print(f"plot failed: {e}")


def sweep_summary(sweep) -> str:
    """Per swept case: the fastest config of each kernel (v2, kt, stream, ring) and the overall best, as a table."""
    cases: dict = {}
    for r in sweep:
        if r["config"] != "transpose-only":
            cases.setdefault((r["R"], r["K"], r["T"], r["spec"]), []).append(r)
    lines = ["| layer | tokens | spec | cuBLAS us | best | x cuBLAS | best per kernel (us) | max rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for (R, K, T, spec), runs in cases.items():
        runs = sorted(runs, key=lambda r: r["us"])
        family: dict = {}
        for r in runs:
            c = configs.BY_NAME.get(r["config"].split("@")[0])
            family.setdefault(c.kernel if c else "?", r)
        best = runs[0]
        per = ", ".join(f"{k} {r['us']:.1f} ({r['config']})" for k, r in family.items())
        lines.append(f"| {R}x{K} | {T} | {spec} | {best['dense_us']:.1f} | {best['config']} {best['us']:.1f} | "
                     f"{best['dense_us'] / best['us']:.2f} | {per} | {max(r.get('rel_err', 0) for r in runs):.1e} |")
    return "\n".join(lines) + "\n"


def tables(rows, card) -> str:
    lines = [f"Card: **{card}**. Cells: Spatha speedup over cuBLAS dense `F.linear` (x) / over cuSPARSELt 2:4 "
             "(same run, CUDA-graph replay, median). `-`: not run or failed.\n"]
    for dtype in sorted({r["dtype"] for r in rows}):
        toks = sorted({r["T"] for r in rows})
        lines.append(f"\n### {dtype}\n")
        lines.append("| layer | spec | " + " | ".join(f"{t} tok" for t in toks) + " |")
        lines.append("|---|---|" + "---|" * len(toks))
        keys = []
        for r in rows:
            k = (r["layer"], r["spec"])
            if r["dtype"] == dtype and k not in keys:
                keys.append(k)
        for layer, spec in keys:
            cells = []
            for t in toks:
                rr = [r for r in rows if r["dtype"] == dtype and r["layer"] == layer and r["spec"] == spec and r["T"] == t]
                if not rr or rr[0]["x_dense"] is None:
                    cells.append("-")
                else:
                    r = rr[0]
                    c = f"{r['x_dense']:.2f}"
                    c += f" / {r['x_cusparselt']:.2f}" if r["x_cusparselt"] else " / -"
                    cells.append(c)
            lines.append(f"| {layer} | {spec} | " + " | ".join(cells) + " |")
        lines.append("\nAbsolute times (us), Spatha | cuBLAS | cuSPARSELt:\n")
        lines.append("| layer | spec | " + " | ".join(f"{t} tok" for t in toks) + " |")
        lines.append("|---|---|" + "---|" * len(toks))
        for layer, spec in keys:
            cells = []
            for t in toks:
                rr = [r for r in rows if r["dtype"] == dtype and r["layer"] == layer and r["spec"] == spec and r["T"] == t]
                if not rr:
                    cells.append("-")
                    continue
                r = rr[0]
                f = lambda v: f"{v:.1f}" if v else "-"
                cells.append(f"{f(r['spatha_us'])} \\| {f(r['dense_us'])} \\| {f(r['cusparselt_us'])}")
            lines.append(f"| {layer} | {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path, card):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = {r["dtype"] for r in rows}
    dtype = "float16" if "float16" in dtypes else min(dtypes)  # one dtype per plot: fp16 if it ran
    rows = [r for r in rows if r["dtype"] == dtype]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    n = len(layers)
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(n / cols)), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for spec in dict.fromkeys(r["spec"] for r in rows):
            rr = [r for r in rows if r["layer"] == layer and r["spec"] == spec and r["x_dense"]]
            if rr:
                ax.plot([r["T"] for r in rr], [r["x_dense"] for r in rr], marker="o", label=f"Spatha {spec}")
        rr = [r for r in rows if r["layer"] == layer and r["spec"] == "64:2:8" and r["cusparselt_us"]]
        if rr:
            ax.plot([r["T"] for r in rr], [r["dense_us"] / r["cusparselt_us"] for r in rr], "k--", label="cuSPARSELt 2:4")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("x over cuBLAS")
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"V:2:M SpMM speedup over dense cuBLAS, {dtype.replace('float', 'fp').replace('bfp', 'bf')}, {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
