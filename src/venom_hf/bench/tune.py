"""``venom-hf tune``: time every shipped tile config on this card for a model's layer shapes and token counts,
and write the dispatch table that the kernels read (``venom_hf.kernels.dispatch``).

For each layer shape (the projections of a Hugging Face config, their fused q|k|v and gate|up rows, or
``--shapes RxK``), V:2:M format and token count, every config that accepts the call is checked against a
float64 reference and timed with cold weights (rotated copies, twice the L2 in all, as a model streams
them) in a CUDA graph; the fastest correct one becomes the entry. The heuristic's own choice is timed in the
same run, so the report says what the table buys. By default the table is merged into the user's table for
this card (``$VENOM_HF_CACHE/dispatch/<card>.json``), which later processes read; ``--out`` writes elsewhere.

    venom-hf tune --model path/to/checkpoint            # a model folder with a config.json
    venom-hf tune --preset llama3-8b gemma3-270m        # the shapes of venom_hf.bench.generate's models
    venom-hf tune --shapes 4096x4096 14336x4096 --formats 64:2:8 --tokens 1 8 512
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

PRESET_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PRESET_FORMATS = ("64:2:8", "64:2:16")
ENCODERS = ("bert", "mpnet", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra")
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative Frobenius error vs float64


def config_shapes(cfg) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of the attention and MLP projections of a transformers config,
    with the fused q|k|v and gate|up shapes that ``fuse_projections`` makes (encoders: q|k|v only)."""
    cfg = getattr(cfg, "text_config", None) or cfg
    h = cfg.hidden_size
    n = cfg.num_attention_heads
    nk = getattr(cfg, "num_key_value_heads", None) or n
    d = getattr(cfg, "head_dim", None) or h // n
    i = cfg.intermediate_size
    shapes = {"q": (n * d, h), "kv": (nk * d, h), "o": (h, n * d), "up": (i, h), "down": (h, i),
              "qkv fused": (n * d + 2 * nk * d, h)}
    if getattr(cfg, "model_type", "") not in ENCODERS:  # decoders' gated MLPs: gate_proj | up_proj
        shapes["gate|up fused"] = (2 * i, h)
    return shapes


def padded(R: int, K: int, spec) -> tuple[int, int]:
    """(rows, groups) of the packed tensors: the dispatch key."""
    from venom_hf.format import packed_shapes

    rp, gp, _ = packed_shapes(R, K, spec)["values"]
    return rp, gp


def candidates(T: int, rows: int, groups: int, spec, num_sms: int, max_smem: int, tma: bool = False,
               wg: bool = False) -> list[str]:
    """Config names that would really run this call when forced (a forced config that does not fit falls
    back in the search: those are left out), of the kernels meant for this token count."""
    from venom_hf.kernels import configs, dispatch, ops

    out = []
    for c in configs.CONFIGS:
        # decode kernels (ring, stream, the v2 decode tiles) up to 16 tokens, the others above; the v2
        # kernel's tiles of either kind compete up to 64 tokens, where both can win
        decode_kernel = c.decode or c.name.startswith("decode")
        if (T <= dispatch.DECODE_MAX_TOKENS) != decode_kernel and not (c.kernel == "v2" and T <= 64):
            continue
        got = ops.choose_config(T, rows, groups, spec.v, spec.m, num_sms, max_smem, c.name, tma, wg)[0]
        if got is not None and got.name == c.name:
            out.append(c.name)
    return out


def heuristic_choice(T: int, rows: int, groups: int, spec, num_sms: int, max_smem: int,
                     tma: bool = False, wg: bool = False) -> str | None:
    from venom_hf.kernels import ops

    c = ops._search_config(T, rows, groups, spec.v, spec.m, num_sms, max_smem, None, tma, wg)[0]
    return None if c is None else c.name


def random_layer(R: int, K: int, spec, dtype, gen):
    """A random dense weight and its packed V:2:M form (random column sets and pairs)."""
    import venom_hf as vf

    from . import spmm as S

    w = (torch.randn(R, K, device="cuda", generator=gen) / math.sqrt(K)).to(dtype)
    return w, vf.pack(w, spec, mask=S.random_vnm_mask(R, K, spec.v, spec.m, gen))


def tune_case(w: torch.Tensor, p, spec, T: int, gen, num_sms: int, max_smem: int, tma: bool = False,
              wg: bool = False) -> dict:
    """Time every candidate config of one (layer, format, tokens) case; the entry with its timings."""
    import venom_hf as vf
    from venom_hf.kernels import ops

    from . import spmm as S

    R, K = w.shape
    dtype = w.dtype
    rows, groups = p.values.shape[0], p.values.shape[1]
    x = torch.randn(T, K, device="cuda", generator=gen).to(dtype)
    ref = x.double() @ vf.unpack(p).double().t()
    names = candidates(T, rows, groups, spec, num_sms, max_smem, tma, wg)
    times, errors = {}, {}
    wbytes = S.nbytes(p.values, p.columns, p.meta)
    for name in names:
        def call(v_, c_, m_, name=name):
            return ops._spmm_cuda(x, v_, c_, m_, None, spec.v, spec.m, R, config=name)

        try:
            y = call(p.values, p.columns, p.meta)
            err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
            if not math.isfinite(err) or err > TOLERANCE[dtype]:
                errors[name] = f"relative error {err:.2e}"
                continue
            times[name] = S.time_graph(S.cold(call, [p.values, p.columns, p.meta], wbytes))
        except Exception as e:  # noqa: BLE001 - a config that fails here is not picked; the report says why
            errors[name] = f"{type(e).__name__}: {e}"
    dense_us = S.time_graph(S.cold(lambda w_: torch.nn.functional.linear(x, w_), [w], S.nbytes(w)))
    heur = heuristic_choice(T, rows, groups, spec, num_sms, max_smem, tma, wg)
    entry = {"v": spec.v, "m": spec.m, "rows": rows, "groups": groups, "tokens": T, "shape": [R, K],
             "dense_us": round(dense_us, 2), "heuristic": heur,
             "heuristic_us": None if heur not in times else round(times[heur], 2)}
    if times:
        best = min(times, key=times.get)
        entry.update(config=best, us=round(times[best], 2))
    entry["candidates"] = {k: round(v, 2) for k, v in sorted(times.items(), key=lambda kv: kv[1])}
    if errors:
        entry["rejected"] = errors
    return entry


def merge_into(path: Path, table: dict) -> dict:
    """``table``'s entries over those already in ``path`` (same card and SM count), keyed by shape and tokens."""
    from venom_hf.kernels import dispatch

    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
            dispatch.validate_table(old, str(path))
        except (ValueError, OSError) as e:
            print(f"venom-hf tune: replacing unreadable table {path}: {e}", file=sys.stderr)
            old = None
    if old is None or old.get("num_sms") != table["num_sms"]:
        return table
    key = lambda e: (e["v"], e["m"], e["rows"], e["groups"], e["tokens"])  # noqa: E731
    merged = {key(e): e for e in old["entries"]}
    merged.update({key(e): e for e in table["entries"]})
    return dict(table, entries=sorted(merged.values(), key=key))


def report(entries: list[dict], card: str) -> str:
    """Markdown: per case the tuned config against the heuristic's and cuBLAS, same run."""
    lines = [f"# Dispatch table: {card}", "",
             "Cold weights, CUDA graph; us per call. `x heur.` = heuristic's time / tuned time; "
             "`x cuBLAS` = F.linear on the dense weight / tuned time.", "",
             "| shape | format | tokens | tuned | us | heuristic | us | x heur. | x cuBLAS |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    for e in entries:
        if "config" not in e:
            continue
        h = e.get("heuristic_us")
        h_us, gain = ("-", "-") if h is None else (f"{h:.1f}", f"{h / e['us']:.2f}")
        lines.append(f"| {e['shape'][0]}x{e['shape'][1]} | {e['v']}:2:{e['m']} | {e['tokens']} | {e['config']} | "
                     f"{e['us']:.1f} | {e['heuristic']} | {h_us} | {gain} | {e['dense_us'] / e['us']:.2f} |")
    gains = [e["heuristic_us"] / e["us"] for e in entries if e.get("heuristic_us") and "config" in e]
    if gains:
        mean = math.exp(statistics.fmean(map(math.log, gains)))
        lines += ["", f"{len(gains)} cases: tuned vs heuristic geometric mean x{mean:.3f}, best x{max(gains):.2f}; "
                      f"{sum(g > 1.02 for g in gains)} cases more than 2 % faster."]
    return "\n".join(lines) + "\n"


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="venom-hf tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("layer shapes (any combination)")
    src.add_argument("--model", nargs="*", default=[], metavar="PATH",
                     help="folders with a transformers config.json: their projection shapes, fused ones too")
    src.add_argument("--preset", nargs="*", default=[], metavar="NAME",
                     help="shapes of venom_hf.bench.generate's models (llama3-8b, gemma3-270m, smollm2-135m) "
                          "or 'encoder' (BERT/MPNet-base: 768 hidden, 3072 FFN)")
    src.add_argument("--shapes", nargs="*", default=[], metavar="RxK", help="out_features x in_features")
    ap.add_argument("--formats", nargs="+", default=list(PRESET_FORMATS), help="V:2:M formats")
    ap.add_argument("--tokens", nargs="+", type=int, default=list(PRESET_TOKENS))
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--out", default=None,
                    help="table file to write (default: merged into this card's user table, which is read at run time)")
    ap.add_argument("--report", default=None, help="also write the markdown report here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting new cases after this many seconds (0: none); what was measured is written")
    args = ap.parse_args(argv)
    if not (args.model or args.preset or args.shapes):
        ap.error("give layer shapes: --model PATH, --preset NAME or --shapes RxK")
    if any(t < 1 for t in args.tokens):
        ap.error("--tokens must be >= 1")
    return args


def collect_shapes(args) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for path in args.model:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"venom-hf tune: error: cannot read a transformers config from {path!r}: {e}")
        shapes.update({f"{Path(path).name} {k}": v for k, v in config_shapes(cfg).items()})
    for name in args.preset:
        if name == "encoder":
            from transformers import BertConfig

            cfg = BertConfig()
        else:
            from .generate import MODELS, model_config

            if name not in MODELS:
                raise SystemExit(f"venom-hf tune: error: unknown preset {name!r} (known: {', '.join(MODELS)}, encoder)")
            cfg = model_config(name)
        shapes.update({f"{name} {k}": v for k, v in config_shapes(cfg).items()})
    for s in args.shapes:
        try:
            r, k = (int(p) for p in s.lower().split("x"))
        except ValueError:
            raise SystemExit(f"venom-hf tune: error: shape must be RxK such as 4096x4096, got {s!r}") from None
        shapes[s] = (r, k)
    unique: dict[tuple[int, int], str] = {}
    for name, rk in shapes.items():
        unique.setdefault(rk, name)
    return {name: rk for rk, name in unique.items()}


def main(argv=None) -> int:
    args = _parse_args(argv)
    from venom_hf import VNMSpec
    from venom_hf.kernels import dispatch, ops

    from . import spmm as S

    if not torch.cuda.is_available():
        raise SystemExit("venom-hf tune: error: tuning times the Spatha kernels on a CUDA GPU, and torch sees none")
    specs = []
    for f in args.formats:
        try:
            specs.append(VNMSpec.parse(f))
        except ValueError as e:
            raise SystemExit(f"venom-hf tune: error: format {f!r}: {e}") from None
    shapes = collect_shapes(args)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    idx = torch.cuda.current_device()
    card = torch.cuda.get_device_name(idx)
    arch, num_sms, max_smem = ops._device_info(idx)
    props = torch.cuda.get_device_properties(idx)
    S.L2_BYTES = int(getattr(props, "L2_cache_size", 0) or S.L2_BYTES)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    cases = [(name, R, K, s, T) for name, (R, K) in shapes.items() for s in specs for T in args.tokens]
    print(f"venom-hf tune: {card} ({arch}, {num_sms} SMs), {len(shapes)} shapes x {len(specs)} formats x "
          f"{len(args.tokens)} token counts = {len(cases)} cases, {args.dtype}", flush=True)
    try:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc="tune", unit="case")
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        it = cases
    entries, t0, layer = [], time.perf_counter(), None
    seen, skipped = set(), 0
    for name, R, K, s, T in it:
        rows, groups = padded(R, K, s)
        if (s.v, s.m, rows, groups, T) in seen:  # shapes that pad to the same packed tensors
            continue
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            skipped += 1
            continue
        seen.add((s.v, s.m, rows, groups, T))
        if layer is None or layer[0] != (R, K, str(s)):
            layer = ((R, K, str(s)), *random_layer(R, K, s, dtype, gen))
            torch.cuda.empty_cache()
        e = tune_case(layer[1], layer[2], s, T, gen, num_sms, max_smem, ops.device_has_tma(idx),
                      ops.device_has_wgmma(idx))
        e["layer"] = name
        entries.append(e)
    layer = None
    if skipped:
        print(f"venom-hf tune: --budget-s reached, {skipped} cases not measured", file=sys.stderr)
    table = {"format": dispatch.TABLE_FORMAT, "card": card, "arch": arch, "num_sms": num_sms,
             "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
             "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 1),
             "entries": [e for e in entries if "config" in e]}
    path = Path(args.out) if args.out else dispatch.user_table_path(card)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = merge_into(path, table) if path.exists() else table
    path.write_text(json.dumps(table, indent=1) + "\n")
    dispatch.reload()
    ops._PLANS.clear()
    md = report(entries, card)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(md)
    print(md)
    print(f"venom-hf tune: wrote {len(table['entries'])} entries to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
