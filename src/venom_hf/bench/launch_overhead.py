"""Host time of one eager call: ``VNMSparseLinear`` (cached launch plan), the bare ``venom::spmm`` op,
``nn.Linear`` and ``F.linear`` on the same layer, back to back, 1 token.

On a small layer the GPU work is a few microseconds, so the time per call of many back-to-back calls is
the host's: what an eager ``generate()`` pays per projection. Prints a table, writes JSON.

``--decoder-layer MODEL`` times what a decoder layer of that model shape (``bench.generate``'s configs)
issues per token instead: its 7 projections in the order and with the inputs a transformers layer uses
(q/k/v of one tensor, o, gate/up of one tensor, down), dense ``nn.Linear`` against each packed format
(fused q|k|v and gate|up, as ``compress`` leaves them). The time is the host's time to *issue* a batch of
layers (measured before the GPU is synchronized, so a GPU slower than the host does not show up), in rounds
over the formats in alternating order, median over rounds.

    python -m venom_hf.bench.launch_overhead --out out/launch
    python -m venom_hf.bench.launch_overhead --decoder-layer llama3-8b --out out/launch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def _issue_projections(layer: nn.Module, x: torch.Tensor, xo: torch.Tensor, xd: torch.Tensor) -> None:
    a, mlp = layer.self_attn, layer.mlp
    a.q_proj(x), a.k_proj(x), a.v_proj(x), a.o_proj(xo)
    mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj(xd)


@torch.no_grad()
def measure_decoder_layer(model: str, formats, tokens=(1, 8), rounds: int = 30, layers: int = 100,
                          device: str = "cuda", dtype: torch.dtype = torch.bfloat16, tiny: bool = False) -> list[dict]:
    """Host time to issue one decoder layer's projections, dense and per format (see the module doc); a row
    per token count with the median microseconds per layer and the ratio to dense. ``layers`` layers per
    round, each on a fresh input tensor (a fused group serves its siblings only for the tensor it ran on)."""
    from transformers import AutoModelForCausalLM

    from .generate import _sync, apply_format, model_config

    device = torch.device(device)
    cfg = model_config(model, tiny)
    cfg.num_hidden_layers = 1  # one layer's shapes are what is timed
    built = {}
    for fmt in ("dense", *[f for f in formats if f != "dense"]):
        torch.manual_seed(0)
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        apply_format(m, fmt)
        built[fmt] = m.model.layers[0]
    names = list(built)
    rows = []
    for t in tokens:
        x = torch.randn(t, 1, cfg.hidden_size, device=device, dtype=dtype)
        xo = torch.randn(t, 1, built["dense"].self_attn.o_proj.in_features, device=device, dtype=dtype)
        xd = torch.randn(t, 1, cfg.intermediate_size, device=device, dtype=dtype)
        us: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                layer = built[n]
                for _ in range(5):  # launch plans, allocator
                    _issue_projections(layer, x.clone(), xo, xd)
                xs = [x.clone() for _ in range(layers)]
                _sync(device)
                t0 = time.perf_counter()
                for xi in xs:
                    _issue_projections(layer, xi, xo, xd)
                us[n].append((time.perf_counter() - t0) / layers * 1e6)
                _sync(device)
        med = {n: statistics.median(v) for n, v in us.items()}
        rows.append({"model": model, "tokens": t, "rounds": rounds, "layers_per_round": layers,
                     "us_per_layer": med, "us_rounds": us,
                     "over_dense": {n: med[n] / med["dense"] for n in names}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["256x256", "4096x4096"], help="OUTxIN layer shapes")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--spec", default="64:2:8")
    ap.add_argument("--out", default="out/launch")
    ap.add_argument("--decoder-layer", metavar="MODEL", default=None,
                    help="time one decoder layer's projections of this model shape (llama3-8b, gemma3-270m, "
                         "smollm2-135m) instead of single layers")
    ap.add_argument("--formats", nargs="+", default=["64:2:8", "64:2:16"],
                    help="packed formats for --decoder-layer (dense is always timed)")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8], help="tokens per call for --decoder-layer")
    ap.add_argument("--rounds", type=int, default=30, help="rounds over the formats for --decoder-layer")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_overhead needs a CUDA GPU")
    if args.decoder_layer:
        return _decoder_layer_main(args)
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


def _decoder_layer_main(args) -> int:
    rows = measure_decoder_layer(args.decoder_layer, args.formats, args.tokens, args.rounds)
    card = torch.cuda.get_device_name()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"launch_overhead_{args.decoder_layer}_layer.json")
    with open(path, "w") as f:
        json.dump({"card": card, "torch": torch.__version__, "rows": rows}, f, indent=1)
    names = list(rows[0]["us_per_layer"])
    print(f"host time to issue one {args.decoder_layer} decoder layer's 7 projections, {card} (us, median of "
          f"{rows[0]['rounds']} rounds of {rows[0]['layers_per_round']} layers)")
    print("| tokens | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in rows:
        print(f"| {r['tokens']} | " + " | ".join(f"{r['us_per_layer'][n]:.1f} ({r['over_dense'][n]:.2f}x)"
                                                 for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
