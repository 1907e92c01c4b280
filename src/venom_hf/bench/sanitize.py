"""Small Spatha calls for compute-sanitizer, and single calls for Nsight Compute.

Default: every shipped tile config (``venom_hf.kernels.configs.CONFIGS``, forced by name) on the first small
cases it accepts, plus the automatic dispatch on a few shapes, in fp16 and bf16: residues in every dimension,
padded shapes, bias, split-K. Each output is checked against a float64 reference; the exit code is 1 when
one is wrong. Run it under the sanitizer::

    compute-sanitizer --tool memcheck --report-api-errors no python -m venom_hf.bench.sanitize
    compute-sanitizer --tool racecheck python -m venom_hf.bench.sanitize --quick   # one case per config, fp16
    compute-sanitizer --tool racecheck python -m venom_hf.bench.sanitize --configs wg   # only configs wg*

``--profile prefill|decode|decode16`` instead runs one layer call five times (the Llama-7B-shaped prefill,
1-token decode of a fused q|k|v, 16-token decode), for ``ncu -k regex:spatha_spmm --launch-skip 3
--launch-count 1``; ``--shape``, ``--tokens``, ``--spec`` and ``--config`` change the case.
"""

from __future__ import annotations

import argparse
import sys

import torch

from venom_hf import format as vf
from venom_hf import kernels
from venom_hf.kernels import configs, ops

# (out_features, in_features, V, M, tokens): odd sizes so that every dimension has a residue
CASES = [
    (200, 300, 64, 8, 1), (136, 520, 16, 16, 16), (4096, 1000, 32, 4, 8), (1000, 4096, 64, 16, 13),
    (576, 576, 64, 8, 3), (200, 300, 64, 8, 5), (1000, 4096, 32, 16, 8), (1536, 576, 32, 16, 1),
    (576, 1536, 64, 8, 9), (320, 1000, 32, 4, 3), (136, 520, 16, 32, 16), (200, 300, 64, 8, 33),
    (192, 576, 16, 8, 70), (768, 264, 64, 8, 77), (136, 520, 32, 16, 300), (576, 576, 64, 32, 70),
    (256, 1000, 128, 4, 130), (576, 576, 128, 32, 130), (768, 264, 64, 8, 257),
    # the smallest the TMA decode configs take: their other cases are too slow under racecheck
    (256, 512, 64, 8, 1), (256, 512, 64, 8, 13),
]
AUTO = [(200, 300, 64, 8, 1), (136, 520, 16, 16, 33), (576, 576, 128, 32, 130), (4096, 1000, 64, 8, 1)]
PROFILES = {"prefill": (4096, 4096, 2048, "64:2:8"), "decode": (12288, 4096, 1, "64:2:8"),
            "decode16": (11008, 4096, 16, "64:2:8")}
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def max_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error of any output element relative to its own size plus its row's RMS (a wrong element or a
    wrong row shows up whatever the number of rows)."""
    rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
    return ((y.double() - ref).abs() / (ref.abs() + rms).clamp_min(1e-30)).max().item()


def card() -> tuple[int, int]:
    """(SM count, opt-in shared memory per block) of the current GPU: what the dispatch sizes its choice by."""
    props = torch.cuda.get_device_properties(0)
    return props.multi_processor_count, int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def accepted(c, case, nsm: int, smem: int) -> bool:
    R, K, v, m, T = case
    rp, gp, _ = vf.packed_shapes(R, K, f"{v}:2:{m}")["values"]
    idx = torch.cuda.current_device()
    tma, wg = ops.device_has_tma(idx), ops.device_has_wgmma(idx)
    return ops.choose_config(T, rp, gp, v, m, nsm, smem, c.name, tma, wg)[0] is c


def _natural(c, tokens: int) -> bool:
    if c.kernel in ("stream", "ring", "tma"):
        return tokens <= c.bn
    if c.kernel in ("kt", "wg"):
        return tokens > 64
    return tokens <= 16 if c.name.startswith("decode") else tokens > 16


def plan(quick: bool, prefix: str = "") -> list:
    """[(case, config name or None)]: each config (whose name starts with ``prefix``) on the first cases it
    accepts, then the automatic dispatch (only without a prefix)."""
    nsm, smem = card()
    out = []
    for c in [c for c in configs.CONFIGS if c.name.startswith(prefix)]:
        fits = [case for case in CASES if accepted(c, case, nsm, smem)]
        # the token counts the dispatch sends to this config first (its residues), then any other that fits;
        # --quick (racecheck, which slows every shared-memory access by orders of magnitude) the smallest of them
        cases = sorted(fits, key=lambda case: (not _natural(c, case[4]), case[0] * case[1] if quick else 0))
        cases = cases[: 1 if quick else 2]
        if not cases:
            print(f"config {c.name}: no case of the set fits it on this card (skipped)")
        out += [(case, c.name) for case in cases]
    if not out:
        raise SystemExit(f"no shipped config name starts with {prefix!r}")
    return out + ([] if prefix else [(case, None) for case in (AUTO[:1] if quick else AUTO)])


def run_set(quick: bool, prefix: str = "") -> int:
    bad = 0
    dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16)
    for (R, K, v, m, T), cfg in plan(quick, prefix):
        for dt in dtypes:
            w = torch.randn(R, K, device="cuda").to(dt)
            p = vf.pack(w, f"{v}:2:{m}")
            x = torch.randn(T, K, device="cuda").to(dt)
            b = torch.randn(R, device="cuda").to(dt)
            y = ops._spmm_cuda(x, p.values, p.columns, p.meta, b, v, m, R, config=cfg)
            ref = x.double() @ vf.unpack(p).double().T + b.double()
            err = max_error(y, ref)
            ok = bool(torch.isfinite(y).all()) and err < TOL[dt]
            bad += not ok
            print(f"{R}x{K} {v}:2:{m} T={T} {str(dt)[6:]} cfg={cfg or 'auto'}: err {err:.2e} {'ok' if ok else 'FAIL'}",
                  flush=True)
    torch.cuda.synchronize()
    print(f"{'FAILED: ' + str(bad) if bad else 'all'} calls {'wrong' if bad else 'match float64'}")
    return 1 if bad else 0


def profile(which: str, shape: str | None, tokens: int | None, spec: str | None, config: str | None) -> int:
    R, K, T, s = PROFILES[which]
    if shape:
        R, K = (int(n) for n in shape.lower().split("x"))
    T, s = tokens or T, vf.VNMSpec.parse(spec or s)
    w = torch.randn(R, K, device="cuda").half()
    p = vf.pack(w, s)
    x = torch.randn(T, K, device="cuda").half()
    for _ in range(5):
        y = ops._spmm_cuda(x, p.values, p.columns, p.meta, None, s.v, s.m, R, config=config)
    torch.cuda.synchronize()
    idx = torch.cuda.current_device()
    cfg = ops.choose_config(T, p.values.shape[0], p.values.shape[1], s.v, s.m, *card(), config,
                            ops.device_has_tma(idx), ops.device_has_wgmma(idx))[0]
    print(f"profiled {R}x{K} {s} T={T} fp16 config {cfg.name if cfg else 'reference'}: output {tuple(y.shape)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one case per config, fp16 only (for racecheck)")
    ap.add_argument("--configs", default="", metavar="PREFIX", help="only the configs whose name starts so")
    ap.add_argument("--profile", choices=sorted(PROFILES),
                    help="run one layer call 5 times instead (for ncu, or racecheck of one shape)")
    ap.add_argument("--shape", help="--profile: RxK, e.g. 4096x11008")
    ap.add_argument("--tokens", type=int, help="--profile: tokens")
    ap.add_argument("--spec", help="--profile: V:2:M spec")
    ap.add_argument("--config", help="--profile: force a tile config by name (default: the dispatch's choice)")
    args = ap.parse_args(argv)
    kernels.require_available()
    if args.profile:
        return profile(args.profile, args.shape, args.tokens, args.spec, args.config)
    return run_set(args.quick, args.configs)


if __name__ == "__main__":
    sys.exit(main())
