"""``model.generate()`` speed the way a user gets it: dense vs V:N:M (and cuSPARSELt 2:4) in one process.

Models are built from embedded configs with random weights (speed does not depend on their values; nothing
is downloaded): ``llama3-8b`` (Llama-3-8B shape), ``gemma3-270m`` (Gemma-3-270M shape, sliding/full layer
pattern of the real model) and ``smollm2-135m`` (SmolLM2-135M shape). Sparse formats go through the public
API only: ``venom_hf.prune(..., method="magnitude")`` -> ``venom_hf.compress`` -> ``venom_hf.fuse_projections``.

Per model and format it measures

* prefill: one ``model(input_ids, use_cache=False)`` forward per shape (``1x2048``, ``8x512``), median ms;
* decode tokens/s of greedy ``model.generate()``, eager (default dynamic cache) and with a static cache
  (transformers compiles the forward itself when the model allows it), batch 1 and 8, from the difference
  of two generation lengths: ``batch * (L2 - L1) / (t(L2) - t(L1))``, which cancels prefill and set-up;
* peak GPU memory per mode (the model's weights + what the cell allocated + the sm_90 prefill kernel's chunk
  layouts, which live in driver memory) and the weight bytes (projections and lm_head separately);
* for selected cells (default: llama3-8b dense and 64:2:8, static cache, the smallest batch run or
  ``--profile-batch``) a torch.profiler split of one decode step into projection GEMM/SpMM time, other GPU
  kernels and GPU idle, the Amdahl bounds it implies for the sparse formats, and a cProfile split of the
  same step's host time (calls, self and cumulative time per Python function).

All formats of a model are built first and stay in memory (``--sequential``: one at a time). Every cell is
host-sensitive (decode of a small model is bound by ``generate()``'s host time per token, static cache
included), so its ``--repeats`` are rounds over all formats in alternating order, and a drift of the
machine's speed during the run reaches every format alike. Static-cache cells run after the others; each
format compiles its graphs in the first round and keeps them (and its cache) for the later rounds.

Writes ``generate_<card>.json`` / ``.md`` / ``.png`` into ``--out`` after every format, so a run that is
stopped still leaves its results, and prints the markdown at the end. A failing cell (e.g. 2:4 under
torch.compile) is recorded with its error and the run goes on; ``--budget-s`` skips what would not fit.

Where the time goes on a GPU: the static-cache cells are dominated by the first call, in which transformers
has torch.compile trace, lower and CUDA-graph the whole forward (tens of seconds per model, format and batch
size; batch 8 recompiles); eager cells cost (L2 + repeats x (L1 + L2)) decode steps (the warm-up runs L2);
prefill and model building are seconds. ``--skip`` drops cells by pattern, e.g. ``'smollm2-135m:*:static:b8'``.

    python -m venom_hf.bench.generate --out out/generate --budget-s 480
    python -m venom_hf.bench.generate --tiny --models smollm2-135m --formats dense 64:2:8   # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn as nn

__all__ = ["main", "MODELS", "model_config", "build_model", "apply_format", "make_prompt", "greedy",
           "weight_bytes", "split_gpu_time", "interval_union", "is_projection_kernel", "amdahl_bounds"]

MODELS = ("llama3-8b", "gemma3-270m", "smollm2-135m")
FORMATS = ("dense", "64:2:8", "64:2:16", "2:4")
MODES = ("prefill", "eager", "static")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_PROFILE = ("llama3-8b:dense", "llama3-8b:64:2:8")

# Kernels that do the projections' matrix products (and, unavoidably, the lm_head's: it is a GEMM of the same
# libraries). Attention kernels are checked first because some of them carry "cutlass" in their names.
_ATTENTION_KERNEL = re.compile(r"fmha|flash|attention|attn|sdpa|softmax", re.I)
_PROJECTION_KERNEL = re.compile(r"spatha|venom|gemm|gemv|cublas|cutlass|nvjet|xmma|cusparse|splitk|triton_tem_", re.I)


# ------------------------------------------------------------------------------------------------ models
def model_config(name: str, tiny: bool = False):
    """The transformers config of ``name``; ``tiny`` keeps the architecture but 2 layers, hidden 128, vocab 512."""
    from transformers import Gemma3TextConfig, LlamaConfig

    if name == "llama3-8b":
        kw = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                  bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
        if tiny:
            kw.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2)
        return LlamaConfig(**kw)
    if name == "smollm2-135m":
        kw = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
        if tiny:
            kw.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
        return LlamaConfig(**kw)
    if name == "gemma3-270m":
        # the real model: 5 sliding-window layers, then 1 full-attention layer, repeated (18 = 3 x 6)
        layers = 2 if tiny else 18
        layer_types = (["sliding_attention", "full_attention"] if tiny else
                       ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)])
        kw = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                  layer_types=layer_types, max_position_embeddings=32768, query_pre_attn_scalar=256,
                  tie_word_embeddings=True)
        if tiny:
            kw.update(hidden_size=128, intermediate_size=256, num_attention_heads=2, head_dim=64, vocab_size=512,
                      sliding_window=16, query_pre_attn_scalar=64)
        return Gemma3TextConfig(**kw)
    raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")


def build_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Random-weight model built directly on ``device`` (the model's own init: normal(0, 0.02)). The same
    seed gives the same weights, so every format starts from the dense model that was timed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name, tiny), dtype=dtype)
    model.eval()
    gc_ = model.generation_config
    # random weights must not stop early: no eos; pad id only so that generate does not warn
    gc_.eos_token_id = None
    gc_.pad_token_id = 0
    return model


def projection_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n.rpartition(".")[2] in PROJECTIONS]


def apply_format(model: nn.Module, fmt: str) -> nn.Module:
    """``fmt`` in place: "dense" (unchanged), "2:4" (cuSPARSELt) or a V:2:M spec through the public API.
    Every format, dense included, gets ``defer_stop_check`` (compress turns it on for V:N:M models): all of
    them run the same generate() loop, and the ratios compare their forwards only."""
    import venom_hf

    if fmt == "dense":
        return venom_hf.defer_stop_check(model)
    if fmt == "2:4":
        from .models import to_semi_structured  # the 2:4 path of the model benchmark, same targets

        return venom_hf.defer_stop_check(to_semi_structured(model))

    venom_hf.prune(model, None, fmt, method="magnitude", progress=False)
    venom_hf.compress(model, progress=False)
    venom_hf.fuse_projections(model)  # idempotent; compress may already have fused q|k|v and gate|up
    return model


def layer_counts(model: nn.Module) -> dict:
    out: dict[str, int] = {}
    for name in projection_names(model):
        mod = model.get_submodule(name)
        kind = type(mod).__name__
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, nn.Parameter):
            kind += f"[{type(w).__name__}]"
        out[kind] = out.get(kind, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------- bytes
def _leaf_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s data (a wrapper subclass such as SparseSemiStructuredTensor
    keeps its packed values and metadata in inner tensors; its own numel is the dense shape's)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        out = []
        for n in names:
            inner = getattr(t, n, None)
            if isinstance(inner, torch.Tensor):
                out.extend(_leaf_tensors(inner))
        return out
    return [t]


def _tensors_nbytes(tensors) -> int:
    """Bytes of the storage regions that ``tensors`` cover, each byte once: tied weights and views of one
    concatenation (fused projections) are not counted twice."""
    regions: dict[tuple, list[tuple[int, int]]] = {}
    for t in tensors:
        for leaf in _leaf_tensors(t):
            if leaf.numel() == 0 or leaf.device.type == "meta":
                continue
            es = leaf.element_size()
            try:
                key = (str(leaf.device), leaf.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):
                key = (str(leaf.device), id(leaf))
            start = leaf.storage_offset() * es
            span = (sum((s - 1) * st for s, st in zip(leaf.shape, leaf.stride())) + 1) * es
            regions.setdefault(key, []).append((start, start + max(span, leaf.numel() * es)))
    return int(sum(interval_union(iv) for iv in regions.values()))


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of parameters + buffers: total, the projection layers, and the lm_head (read by every decode
    step whether or not it is tied to the embeddings)."""
    total = _tensors_nbytes([*model.parameters(), *model.buffers()])
    proj = _tensors_nbytes([t for n in projection_names(model) for m in [model.get_submodule(n)]
                            for t in [*m.parameters(), *m.buffers()]])
    head = model.get_output_embeddings()
    lm = _tensors_nbytes([head.weight]) if head is not None and getattr(head, "weight", None) is not None else 0
    return {"total": total, "projections": proj, "lm_head": lm}


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (the other formats' models included)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def _peak(device: torch.device, base: int, model: nn.Module) -> int | None:
    """Peak GPU memory of this model's cell: its own weights plus what the cell allocated above ``base`` (so
    that the models of the other formats, resident in the same process, are not counted) plus the chunk
    layouts built for its weights (driver memory, outside torch's counters)."""
    if device.type != "cuda":
        return None
    from venom_hf.kernels import ops

    layouts = ops.layout_bytes([*model.parameters(), *model.buffers()])
    return int(torch.cuda.max_memory_allocated(device)) - base + weight_bytes(model)["total"] + layouts


def make_prompt(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    """Random token ids (drawn on the CPU so that every device gets the same prompt)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


@torch.no_grad()
def time_prefill(model: nn.Module, batch: int, seq: int, repeats: int, seed: int) -> dict:
    device = model.device
    ids = make_prompt(model.config.vocab_size, batch, seq, seed, device)
    base = _reset_peak(device)
    times = []
    for r in range(repeats + 1):  # the first is the warm-up (kernel builds, cuBLAS heuristics, allocator)
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        if r:
            times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times],
            "peak_mem_bytes": _peak(device, base, model)}


def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int, cache=None) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (eos is disabled in ``build_model``); ``cache``:
    a StaticCache to reuse (reset here, so every call replays the same compiled graphs)."""
    kw = {}
    if cache is not None:
        cache.reset()
        kw["past_key_values"] = cache
    with warnings.catch_warnings():
        # newer transformers rename generate's past_key_values to cache; 5.17 knows only the old name
        warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, **kw)


def _dynamo_counts() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - no dynamo in this build: nothing to count
        return {}
    return {"frames_compiled": int(counters["frames"].get("ok", 0)),
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_events": {k: int(v) for k, v in counters["inductor"].items() if "cudagraph" in k}}


def _counts_delta(a: dict, b: dict) -> dict:
    out = {}
    for k, v in b.items():
        if isinstance(v, dict):
            d = {kk: vv - a.get(k, {}).get(kk, 0) for kk, vv in v.items() if vv - a.get(k, {}).get(kk, 0)}
            out[k] = d
        else:
            out[k] = v - a.get(k, 0)
    return out


def new_static_cache(model: nn.Module, max_cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@torch.no_grad()
def time_decode(model: nn.Module, mode: str, batch: int, prompt_len: int, l1: int, l2: int, repeats: int,
                seed: int, keep: dict | None = None) -> dict:
    """Decode tokens/s of ``generate`` by the difference of two lengths. ``mode``: "eager" (transformers'
    default dynamic cache) or "static" (one StaticCache of prompt + L2 positions shared by both lengths, so
    they run the same compiled graphs). ``keep`` receives the cache and prompt for a later profile; a static
    cache already in it is reused (interleaved rounds replay the graphs recorded for it in the first round)."""
    device = model.device
    prompt = make_prompt(model.config.vocab_size, batch, prompt_len, seed, device)
    cache = None
    if mode == "static":
        cache = (keep or {}).get("cache") or new_static_cache(model, prompt_len + l2)
    base = _reset_peak(device)
    c0 = _dynamo_counts()
    _sync(device)
    t0 = time.perf_counter()
    # warm-up of the longer length: for "static" this compiles and records the CUDA graphs; for "eager" it
    # meets every sequence length of the timed runs: on the H200 the first eager L2 run of a process took
    # 2-4x the later ones (a one-off cost per new length, not identified; the formats timed after it in the
    # same round did not pay it), so with a warm-up of L1 only the first round's first format paid it in
    # its timing
    greedy(model, prompt, l2, cache)
    _sync(device)
    warm_s = time.perf_counter() - t0
    c1 = _dynamo_counts()
    t1s, t2s, out = [], [], None
    for _ in range(repeats):
        for n, ts in ((l1, t1s), (l2, t2s)):
            _sync(device)
            t0 = time.perf_counter()
            out = greedy(model, prompt, n, cache)
            _sync(device)
            ts.append(time.perf_counter() - t0)
    c2 = _dynamo_counts()
    dt = statistics.median(t2s) - statistics.median(t1s)
    res = {"tok_s": batch * (l2 - l1) / dt if dt > 0 else None, "step_ms": dt / (l2 - l1) * 1e3 if dt > 0 else None,
           "t_L1_s": t1s, "t_L2_s": t2s, "warmup_s": warm_s, "new_tokens": [l1, l2], "prompt_len": prompt_len,
           "peak_mem_bytes": _peak(device, base, model), "tokens": out[:, prompt_len:].tolist()}
    if dt <= 0:
        res["note"] = "t(L2) <= t(L1): timing noise larger than the decode time; raise L2 or --repeats"
    if c0:
        warm, timed = _counts_delta(c0, c1), _counts_delta(c1, c2)
        res["dynamo_warmup"] = warm
        res["dynamo_timed"] = timed
        res["recompiles"] = timed.get("frames_compiled", 0)  # frames compiled after the warm-up call
        # generate keeps its torch.compile'd forward on the model once it decided to compile
        res["compiled"] = (hasattr(model, "_compiled_call")
                           or warm.get("frames_compiled", 0) + timed.get("frames_compiled", 0) > 0)
    if keep is not None:
        keep.update(cache=cache, prompt=prompt)
    return res


# ---------------------------------------------------------------------------------------------- profile
def interval_union(intervals) -> float:
    """Total length covered by ``(start, end)`` intervals (overlaps counted once)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def is_projection_kernel(name: str) -> bool:
    return not _ATTENTION_KERNEL.search(name) and bool(_PROJECTION_KERNEL.search(name))


def split_gpu_time(kernels, wall: float, is_projection=is_projection_kernel) -> dict:
    """Split ``wall`` seconds into a partition: ``projection`` (some projection GEMM/SpMM kernel running),
    ``other`` (only other kernels running) and ``idle`` (no kernel running). ``kernels``: (name, start, end)."""
    kernels = list(kernels)
    proj = interval_union((s, e) for n, s, e in kernels if is_projection(n))
    busy = interval_union((s, e) for _, s, e in kernels)
    return {"wall": wall, "projection": proj, "other": busy - proj, "idle": max(0.0, wall - busy), "busy": busy,
            "kernels": len(kernels)}


_GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def _activity_kind(e) -> str:
    kind = getattr(e, "activity_type", None)
    if kind is None:
        return "annotation" if _flag(e, "is_user_annotation") else "unknown"
    return str(kind() if callable(kind) else kind).lower()


def _flag(e, name) -> bool:
    v = getattr(e, name, None)
    return bool(v() if callable(v) else v)


def _kernel_events(prof) -> tuple[list[tuple[str, float, float]], dict]:
    """(name, start_s, end_s) of the GPU work in a finished profile (kernels, copies, memsets) and a count of
    the GPU-side record kinds seen. Not counted: the GPU-timeline ranges of record_function annotations
    (compiled graphs and generate add them) and synchronisation records, which span idle gaps."""
    from torch.autograd import DeviceType

    events, kinds = [], {}
    try:
        raw = [e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
        for e in raw:
            kind = _activity_kind(e)
            kinds[kind] = kinds.get(kind, 0) + 1
            s = e.start_ns() * 1e-9
            events.append((kind, e.name(), s, s + e.duration_ns() * 1e-9))
    except AttributeError:  # older event API: FunctionEvents in microseconds
        for e in prof.events():
            if getattr(e, "device_type", None) == DeviceType.CUDA:
                kinds["unknown"] = kinds.get("unknown", 0) + 1
                events.append(("unknown", e.name, e.time_range.start * 1e-6, e.time_range.end * 1e-6))
    work = [(n, s, t) for k, n, s, t in events if k in _GPU_WORK]
    if not work:  # kinds named differently in this build: everything but annotations and syncs
        work = [(n, s, t) for k, n, s, t in events if "annotation" not in k and "sync" not in k]
    return work, kinds


@torch.no_grad()
def profile_decode(model: nn.Module, cache, prompt: torch.Tensor, l1: int, l2: int, top: int = 12,
                   activities=None) -> dict:
    """Per-decode-step split of ``generate``: two profiled runs (L1 and L2 new tokens) and their difference
    divided by L2 - L1, which removes prefill and set-up as the tokens/s measure does. ``cache``: the static
    cache of the cell, or None for an eager (dynamic-cache) cell.
    ``activities``: profiler activities (default CUDA only, which keeps the profiler's host overhead low)."""
    from torch.profiler import ProfilerActivity, profile

    activities = activities or [ProfilerActivity.CUDA]
    device = model.device
    runs = {}
    for n in (l1, l2):
        _sync(device)  # greedy resets a static cache
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            greedy(model, prompt, n, cache)
            _sync(device)
            wall = time.perf_counter() - t0
        kernels, kinds = _kernel_events(prof)
        per_name: dict[str, float] = {}
        for name, s, e in kernels:
            per_name[name] = per_name.get(name, 0.0) + (e - s)
        runs[n] = ({**split_gpu_time(kernels, wall), "record_kinds": kinds}, per_name)
    steps = l2 - l1
    (a, na), (b, nb) = runs[l1], runs[l2]
    step = {k: (b[k] - a[k]) / steps * (1e3 if k != "kernels" else 1) for k in ("wall", "projection", "other",
                                                                                 "idle", "busy", "kernels")}
    by_name = {k: (nb.get(k, 0.0) - na.get(k, 0.0)) / steps * 1e3 for k in nb}
    top_k = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"per_step_ms": {("kernels_per_step" if k == "kernels" else k + "_ms"): v for k, v in step.items()},
            "top_kernels_ms_per_step": [{"name": k[:160], "ms": v, "projection": is_projection_kernel(k)}
                                        for k, v in top_k],
            "runs": {str(n): runs[n][0] for n in (l1, l2)},
            "note": "projection = cuBLAS/cutlass/nvjet/Spatha/cuSPARSELt matrix kernels, which include the "
                    "lm_head GEMM; other = attention, norms, RoPE, elementwise, sampling, copies; idle = step "
                    "wall time with no kernel running"}


def _function_label(key: tuple) -> str:
    """``(file, line, name)`` of a pstats entry as ``package/module.py:name``."""
    file, _line, name = key
    if file == "~":  # C functions: pstats names them like "<method 'item' of ...>"
        return name
    parts = file.replace("\\", "/").split("/")
    for root in ("site-packages", "dist-packages", "src"):
        if root in parts:
            parts = parts[len(parts) - parts[::-1].index(root):]
            break
    else:
        parts = parts[-2:]
    return "/".join(parts) + ":" + name


def _host_stats(model: nn.Module, cache, prompt: torch.Tensor, n: int) -> tuple[dict, float]:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    _sync(model.device)  # greedy resets the cache
    t0 = time.perf_counter()
    prof.enable()
    greedy(model, prompt, n, cache)
    _sync(model.device)
    prof.disable()
    return pstats.Stats(prof).stats, time.perf_counter() - t0


@torch.no_grad()
def host_profile_decode(model: nn.Module, cache, prompt: torch.Tensor, l1: int, l2: int, top: int = 15) -> dict:
    """Where the host time of one static-cache decode step goes: cProfile over ``generate`` of L1 and L2 new
    tokens, their difference per step for every Python function (self and cumulative ms, calls), the top
    ``top`` by cumulative time. cProfile slows Python code down (each call costs more), so the absolute
    numbers are above an unprofiled step's; the shares and the call counts are what to read. A function
    that waits for the GPU (``.item()``, ``synchronize``) holds that wait in its self time."""
    (a, wa), (b, wb) = _host_stats(model, cache, prompt, l1), _host_stats(model, cache, prompt, l2)
    steps = l2 - l1
    rows = []
    for key, (_cc, nc, tt, ct, _callers) in b.items():
        _cc0, nc0, tt0, ct0, _ = a.get(key, (0, 0, 0.0, 0.0, None))
        rows.append({"function": _function_label(key), "calls_per_step": (nc - nc0) / steps,
                     "self_ms": (tt - tt0) / steps * 1e3, "cumulative_ms": (ct - ct0) / steps * 1e3})
    wall = (wb - wa) / steps * 1e3
    rows.sort(key=lambda r: -r["cumulative_ms"])
    by_self = sorted(rows, key=lambda r: -r["self_ms"])
    return {"profiled_step_ms": wall, "python_calls_per_step": sum(r["calls_per_step"] for r in rows),
            "top_cumulative": rows[:top], "top_self": by_self[:top],
            "note": "cProfile, difference of two generation lengths per step; profiled Python runs slower "
                    "than unprofiled, read shares and call counts"}


def amdahl_bounds(dense_step: dict, byte_ratio: float | None = None) -> dict:
    """Speedup bounds over the dense step ``{projection_ms, other_ms, idle_ms, wall_ms}`` if the projection
    time went to zero, and if it shrank by ``byte_ratio`` (decode GEMMs are bandwidth bound)."""
    p, o, i = dense_step["projection_ms"], dense_step["other_ms"], dense_step["idle_ms"]
    wall = p + o + i
    out = {"projection_share": p / wall if wall else None, "bound_projection_zero": wall / (o + i) if o + i else None}
    if byte_ratio is not None:
        out["byte_ratio"] = byte_ratio
        out["bound_by_bytes"] = wall / (o + i + p * byte_ratio)
    return out


# ------------------------------------------------------------------------------------------- reporting
def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def _value(run, metric):
    return run.get(metric) if isinstance(run, dict) else None


def _column_defs(settings: dict) -> list[tuple[str, str, str, str]]:
    """(header, mode, sub-key, metric) for every measured column, in table order."""
    cols = []
    modes = settings["modes"]
    if "prefill" in modes:
        cols += [(f"prefill {s} ms", "prefill", s, "ms") for s in settings["prefill"]]
    for mode in ("eager", "static"):
        if mode in modes:
            cols += [(f"{mode} b{b} tok/s", mode, f"b{b}", "tok_s") for b in settings["batches"]]
    return cols


def _fmt_num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _ratio(v, d, metric):
    if v is None or d is None or not v or not d:
        return None
    return d / v if metric == "ms" else v / d  # >1 is faster than dense for both


def _cell_text(run, dense_run, metric) -> str:
    if not isinstance(run, dict):
        return "-"
    if "error" in run:
        return "error"
    if "skipped" in run:
        return "skipped"
    v = run.get(metric)
    if v is None:
        return "n/a"
    r = _ratio(v, _value(dense_run, metric), metric)
    return f"{_fmt_num(v)} ({r:.2f}x)" if r is not None else _fmt_num(v)


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"# `model.generate()` speed: {res['card']}",
             "",
             f"torch {res['torch']}, transformers {res['transformers']}, venom_hf {res['venom_hf']}, "
             f"{res['dtype']}; random weights; prompt {s['prompt_len']} tokens; decode tok/s = batch x "
             f"({s['new_tokens'][1]} - {s['new_tokens'][0]}) / (t({s['new_tokens'][1]}) - t({s['new_tokens'][0]})) "
             f"of greedy `generate`, medians of {s['repeats']}"
             + ("" if s.get("sequential", False) else
                " (rounds over all formats in alternating order, every model resident)")
             + "; (x) = ratio to dense in this run, >1 is faster."
             + (f" Peak memory: {res['peak_mem_note']}." if res.get("peak_mem_note") else ""),
             ""]
    cols = _column_defs(s)
    for key, m in res.get("models", {}).items():
        lines += [f"## {key}" + (" (tiny)" if s.get("tiny") else ""), "", m.get("shape", ""), ""]
        lines.append("| format | " + " | ".join(c[0] for c in cols) + " | peak memory | weights (projections) |")
        lines.append("|---" * (len(cols) + 3) + "|")
        notes = []
        for fmt, f in m.get("formats", {}).items():
            if "error" in f:
                notes.append(f"- {fmt}: {f['error']}")
            cells = []
            for _, mode, sub, metric in cols:
                run = (f.get(mode) or {}).get(sub)
                dense_run = ((m.get("formats", {}).get("dense") or {}).get(mode) or {}).get(sub)
                cells.append(_cell_text(run, dense_run, metric))
                if isinstance(run, dict) and "error" in run:
                    notes.append(f"- {fmt} {mode} {sub}: {run['error']}")
                elif isinstance(run, dict) and "skipped" in run:
                    notes.append(f"- {fmt} {mode} {sub}: skipped ({run['skipped']})")
                if mode == "static" and isinstance(run, dict) and run.get("tok_s") is not None:
                    if run.get("compiled") is False and res["device"] == "cuda":
                        notes.append(f"- {fmt} static {sub}: generate did not compile the forward (eager with a "
                                     "static cache)")
                    if run.get("recompiles"):
                        notes.append(f"- {fmt} static {sub}: {run['recompiles']} dynamo recompiles after warm-up")
            peaks = [r.get("peak_mem_bytes") for mode in ("prefill", "eager", "static")
                     for r in (f.get(mode) or {}).values() if isinstance(r, dict) and r.get("peak_mem_bytes")]
            peak = _fmt_bytes(max(peaks)) if peaks else "-"
            wb = f.get("weight_bytes")
            wtxt = f"{_fmt_bytes(wb['total'])} ({_fmt_bytes(wb['projections'])})" if wb else "-"
            lines.append(f"| {fmt} | " + " | ".join(cells) + f" | {peak} | {wtxt} |")
        if notes:
            lines += [""] + notes
        lines += _profile_markdown(key, m)
        lines.append("")
    return "\n".join(lines) + "\n"


def _profile_markdown(key: str, m: dict) -> list[str]:
    profs = {fmt: f["profile"] for fmt, f in m.get("formats", {}).items() if isinstance(f.get("profile"), dict)}
    if not profs:
        return []
    batch = next((p["batch"] for p in profs.values() if "batch" in p), 1)
    out = ["", f"### {key}: one static-cache decode step, batch {batch} (torch.profiler)", "",
           "| format | step ms (unprofiled) | projection GEMM/SpMM ms | other kernels ms | GPU idle ms "
           "| kernels/step |",
           "|---|---|---|---|---|---|"]
    for fmt, p in profs.items():
        if "per_step_ms" not in p:
            why = p.get("error") or p.get("skipped") or "no data"
            out.append(f"| {fmt} | {'error' if 'error' in p else 'skipped'}: {why[:120]} | | | | |")
            continue
        st = p["per_step_ms"]
        w = st["wall_ms"] or float("nan")
        un = p.get("unprofiled_step_ms")
        step = f"{w:.3f} ({un:.3f})" if un else f"{w:.3f}"
        parts = [f"{st[k]:.3f} ({st[k] / w:.0%})" for k in ("projection_ms", "other_ms", "idle_ms")]
        out.append(f"| {fmt} | {step} | " + " | ".join(parts) + f" | {st['kernels_per_step']:.0f} |")
    am = m.get("amdahl")
    out += ["", "The projection column holds every GEMM-library kernel, so it includes the lm_head GEMM."]
    out += _host_markdown(profs)
    if am:
        z = am.get("bound_projection_zero")
        if z:
            out.append(f"Amdahl from the dense step: projection time -> 0 gives at most {z:.2f}x dense; with the "
                       "GEMM time scaled by the bytes those kernels read:")
        for fmt, b in am.get("formats", {}).items():
            meas = b.get("measured_static")
            out.append(f"- {fmt}: GEMM-bucket bytes (projections + lm_head) {b['byte_ratio']:.3f}x dense -> bound "
                       f"{b['bound_by_bytes']:.2f}x; measured static b{am.get('batch', 1)} "
                       + (f"{meas:.2f}x ({meas / b['bound_by_bytes']:.0%} of the bound)" if meas else "n/a"))
    return out


def _host_markdown(profs: dict, rows: int = 8) -> list[str]:
    """The host split of the profiled step per format: its Python functions with the most self time."""
    hosts = {fmt: p["host"] for fmt, p in profs.items() if isinstance(p.get("host"), dict)}
    if not hosts:
        return []
    out = ["", "Host time of one step (cProfile over `generate`, per step; profiled Python runs slower than "
           "unprofiled, so read the shares): the functions with the most self time.", ""]
    for fmt, h in hosts.items():
        wall = h["profiled_step_ms"] or float("nan")
        out += [f"{fmt}: profiled step {wall:.2f} ms, {h['python_calls_per_step']:,.0f} Python calls per step", "",
                "| function | calls/step | self ms | share of the step |", "|---|---|---|---|"]
        for r in h["top_self"][:rows]:
            out.append(f"| `{r['function'][:90]}` | {r['calls_per_step']:.0f} | {r['self_ms']:.3f} | "
                       f"{r['self_ms'] / wall:.0%} |")
        out.append("")
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _column_defs(res["settings"])
    models = list(res.get("models", {}))
    if not models:
        return
    fig, axes = plt.subplots(len(models), 1, figsize=(max(7.0, 1.1 * len(cols)), 3.2 * len(models)), squeeze=False)
    for ax, key in zip(axes[:, 0], models):
        fm = res["models"][key].get("formats", {})
        dense = fm.get("dense") or {}
        others = [f for f in fm if f != "dense"]
        width = 0.8 / max(1, len(others))
        for i, fmt in enumerate(others):
            ys = []
            for _, mode, sub, metric in cols:
                r = _ratio(_value((fm[fmt].get(mode) or {}).get(sub), metric),
                           _value((dense.get(mode) or {}).get(sub), metric), metric)
                ys.append(r or 0.0)
            ax.bar([j + i * width for j in range(len(cols))], ys, width, label=fmt)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [c[0].replace(" tok/s", "").replace(" ms", "")
                                                                       for c in cols], fontsize=8)
        ax.set_ylabel("x dense (>1 faster)")
        ax.set_title(f"{key} ({res['card']})", fontsize=9)
        if others:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: dict, out: str, with_plot: bool = True) -> str:
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"generate_{res['card_slug']}")
    res["elapsed_s"] = time.perf_counter() - res["_t0"]
    with open(base + ".json.tmp", "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=1)
    os.replace(base + ".json.tmp", base + ".json")
    md = markdown(res)
    with open(base + ".md", "w") as f:
        f.write(md)
    if with_plot:
        try:
            plot(res, base + ".png")
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
            res.setdefault("plot_error", f"{type(e).__name__}: {e}")
    return md


# ------------------------------------------------------------------------------------------------- main
def _error(e: BaseException) -> dict:
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    last = traceback.format_exception_only(type(e), e)[-1].strip()
    return {"error": last[:600], "where": where}


class Budget:
    """Wall-clock budget: work that would not fit is recorded as skipped, so the files are always written."""

    def __init__(self, seconds: float | None):
        self.t0 = time.perf_counter()
        self.limit = seconds if seconds and seconds > 0 else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, estimate: float = 0.0) -> bool:
        return self.limit is None or self.elapsed() + estimate <= self.limit


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a broken CUDA context: the next cells record their own errors
            pass


def _reset_compiled_state(device: torch.device) -> None:
    """Every format compiles as in a fresh process: dynamo's caches (which also keeps each format within the
    recompile limit of a code object shared by all formats) and the CUDA-graph pools of the last model."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - a build without dynamo has nothing to reset
        pass
    if device.type != "cuda":
        return
    try:
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001 - older/newer torch: dynamo.reset covers it or there is nothing to free
        pass


@contextlib.contextmanager
def _recompile_limit(graphs: int):
    """Room in dynamo's per-code-object cache for ``graphs`` compiled graphs at once (twice that, as headroom):
    the models of every format share the code of their forward, and each (format, batch) compiles its own.
    The next model's build (``_build_format``) resets dynamo and the CUDA-graph pools."""
    cfg = torch._dynamo.config
    old = cfg.recompile_limit
    cfg.recompile_limit = max(old, 2 * graphs)
    try:
        yield
    finally:
        cfg.recompile_limit = old


def _parse_shape(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"prefill shape must be BATCHxSEQ, e.g. 8x512; got {s!r}")
    return int(m.group(1)), int(m.group(2))


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m venom_hf.bench.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS),
                    help="dense, 2:4 (cuSPARSELt, CUDA only) or V:2:M specs such as 64:2:8")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="decode batch sizes")
    ap.add_argument("--new-tokens", nargs=2, type=int, default=[8, 40], metavar=("L1", "L2"),
                    help="the two generation lengths whose time difference gives decode tokens/s")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill", nargs="+", default=["1x2048", "8x512"], help="prefill shapes BATCHxSEQ")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed repeats per measurement (after one warm-up), run as rounds over all formats, "
                         "alternating the order")
    ap.add_argument("--sequential", action="store_true",
                    help="one format's model in memory at a time, all its cells in a row (for GPUs without room "
                         "for every format at once; host-speed drift then favours some formats)")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 128, vocab 512: a CPU smoke test")
    ap.add_argument("--out", default="out/generate")
    ap.add_argument("--profile", nargs="*", default=list(DEFAULT_PROFILE), metavar="MODEL:FORMAT",
                    help="cells whose static-cache decode step is profiled (CUDA only)")
    ap.add_argument("--profile-batch", type=int, default=None,
                    help="the decode batch of the profiles (default: the smallest of --batches)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock budget in seconds (0: none); work that would not fit is skipped")
    ap.add_argument("--skip", nargs="*", default=[], metavar="PATTERN",
                    help="cells not to run, as shell patterns over MODEL:FORMAT:MODE:SUB, e.g. "
                         "'smollm2-135m:*:static:b8' or '*:2:4:static:*' (recorded as skipped)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="auto: bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args(argv)
    l1, l2 = args.new_tokens
    if not 1 <= l1 < l2:
        ap.error("--new-tokens needs 1 <= L1 < L2")
    for fmt in args.formats:
        if fmt not in ("dense", "2:4"):
            from venom_hf import VNMSpec

            try:
                VNMSpec.parse(fmt)
            except Exception as e:  # noqa: BLE001
                ap.error(f"format {fmt!r}: {e}")
    args.prefill_shapes = [_parse_shape(s) for s in args.prefill]
    args.profile_cells = set() if args.no_profile else set(args.profile or ())
    if args.profile_batch is None:
        args.profile_batch = min(args.batches)
    elif args.profile_batch not in args.batches:
        ap.error(f"--profile-batch {args.profile_batch} is not one of --batches {args.batches}")
    return args


def _log(budget: Budget, msg: str) -> None:
    print(f"[generate {budget.elapsed():7.1f}s] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    import transformers

    import venom_hf

    args = _parse_args(argv)
    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if cuda else torch.float32)
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    l1, l2 = args.new_tokens
    res = {"card": card, "card_slug": card_slug(card) if cuda else "cpu", "device": device.type,
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "transformers": transformers.__version__, "venom_hf": venom_hf.__version__,
           "dtype": str(dtype).replace("torch.", ""), "argv": sys.argv[1:] if argv is None else list(argv),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "settings": {"models": args.models, "formats": args.formats, "modes": args.modes, "batches": args.batches,
                        "new_tokens": [l1, l2], "prompt_len": args.prompt_len, "prefill": args.prefill,
                        "repeats": args.repeats, "tiny": args.tiny, "seed": args.seed, "budget_s": args.budget_s,
                        "profile": sorted(args.profile_cells),
                        "profile_batch": args.profile_batch, "skip": args.skip, "sequential": args.sequential},
           "models": {}, "_t0": budget.t0}
    if cuda and args.profile_cells:
        # CUPTI must be set up before the first CUDA graph is captured, or kernels replayed from graphs
        # captured earlier can be missing from later profiles
        try:
            import importlib

            importlib.import_module("torch.profiler._utils")._init_for_cuda_graphs()
        except (ImportError, AttributeError):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
                pass
    estimates: dict[tuple, float] = {}  # (model, mode, sub) -> seconds the last format took, for the budget
    for key in args.models:
        cfg = model_config(key, args.tiny)
        m = res["models"][key] = {
            "shape": (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
                      f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV, vocab {cfg.vocab_size}"
                      + (f", sliding window {cfg.sliding_window}" if getattr(cfg, "sliding_window", None) else "")),
            "config": {k: getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                          "head_dim", "sliding_window", "layer_types",
                                                          "tie_word_embeddings")},
            "formats": {}}
        models: dict[str, nn.Module] = {}
        for fmt in args.formats:
            f = m["formats"][fmt] = {}
            if fmt == "2:4" and not cuda:
                f["skipped"] = "2:4 runs on cuSPARSELt, CUDA only"
                continue
            if not budget.allows():
                f["skipped"] = "budget"
                continue
            model = _build_format(key, fmt, f, args, budget, device, dtype)
            if model is None:
                write_outputs(res, args.out, with_plot=False)
                continue
            if args.sequential:
                _run_format(model, key, fmt, f, args, budget, estimates, device, args.modes)
                model = None
                _free(device)
                _amdahl(m)
                write_outputs(res, args.out, with_plot=False)
            else:
                models[fmt] = model
                model = None
        if models:
            # every cell is timed in rounds over all formats (each round in the other order), so that a drift
            # of the host's speed during the run (decode of small models is host-bound, static cache
            # included) reaches every format alike
            def save():
                write_outputs(res, args.out, with_plot=False)

            _run_interleaved(models, key, m, args, budget, estimates, device,
                             [x for x in args.modes if x != "static"], save)
            if "static" in args.modes:
                _reset_compiled_state(device)
                with _recompile_limit(len(models) * len(args.batches)):
                    _run_interleaved(models, key, m, args, budget, estimates, device, ["static"], save)
            models.clear()
            _free(device)
            _amdahl(m)
        write_outputs(res, args.out)
    md = write_outputs(res, args.out)
    _log(budget, f"done; files in {args.out}")
    print(md, flush=True)
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _build_format(key, fmt, f, args, budget, device, dtype):
    """The model of one format (None when it fails to build: the error is recorded in ``f``)."""
    model = None
    _reset_compiled_state(device)
    _free(device)
    try:
        _log(budget, f"{key} {fmt}: building")
        t0 = time.perf_counter()
        model = build_model(key, args.tiny, device, dtype, args.seed)
        f["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        apply_format(model, fmt)
        f["convert_s"] = time.perf_counter() - t0
        _free(device)
        f["weight_bytes"] = weight_bytes(model)
        f["layers"] = layer_counts(model)
    except Exception as e:  # noqa: BLE001 - record, go on with the next format
        f.update(_error(e))
    if "error" in f:
        # outside the except block, so that the traceback's frames no longer hold the tensors
        _log(budget, f"{key} {fmt}: failed to build: {f['error']}")
        model = None
        _free(device)
    return model


def _skipped(key, fmt, mode, sub, args) -> bool:
    return any(fnmatch.fnmatchcase(f"{key}:{fmt}:{mode}:{sub}", pat) for pat in args.skip)


def _estimate(estimates, key, mode, sub) -> float:
    """The last format's time for this cell of the model; before that, the longest seen for it on any model."""
    est = estimates.get((key, mode, sub))
    if est is None:
        est = max((v for (k2, m2, s2), v in estimates.items() if m2 == mode and s2 == sub), default=0.0)
    return est


def _run_cell(fn, label, budget, device) -> dict:
    _log(budget, label)
    t0 = time.perf_counter()
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001 - one failing mode must not stop the others
        r = _error(e)
    if "error" in r:  # freed outside the except block, whose traceback holds the failed call's tensors
        _log(budget, f"{label}: {r['error']}")
        _free(device)
    r["cell_s"] = time.perf_counter() - t0
    return r


def _merge_rounds(mode: str, rounds: list[dict]) -> dict:
    """One cell's result from its interleaved rounds (each a single timed repeat)."""
    out = dict(rounds[-1])
    out["rounds"] = len(rounds)
    out["cell_s"] = sum(r["cell_s"] for r in rounds)
    peaks = [r["peak_mem_bytes"] for r in rounds if r.get("peak_mem_bytes") is not None]
    out["peak_mem_bytes"] = max(peaks) if peaks else None
    if mode == "prefill":
        out["times_ms"] = [t for r in rounds for t in r["times_ms"]]
        out["ms"] = statistics.median(out["times_ms"])
        return out
    t1s = [t for r in rounds for t in r["t_L1_s"]]
    t2s = [t for r in rounds for t in r["t_L2_s"]]
    l1, l2 = out["new_tokens"]
    batch = len(out["tokens"])
    dt = statistics.median(t2s) - statistics.median(t1s)
    out.update(t_L1_s=t1s, t_L2_s=t2s, warmup_s=sum(r["warmup_s"] for r in rounds),
               tok_s=batch * (l2 - l1) / dt if dt > 0 else None, step_ms=dt / (l2 - l1) * 1e3 if dt > 0 else None)
    if dt > 0:
        out.pop("note", None)
    if "dynamo_warmup" in rounds[0]:
        # the first round's warm-up compiles; any frame compiled after it, in any round, is a recompile
        out["dynamo_warmup"] = rounds[0]["dynamo_warmup"]
        out["recompiles"] = (sum(r.get("recompiles", 0) for r in rounds)
                             + sum(r["dynamo_warmup"].get("frames_compiled", 0) for r in rounds[1:]))
        out["compiled"] = any(r.get("compiled") for r in rounds)
    return out


def _run_interleaved(models: dict, key, m, args, budget, estimates, device, modes, on_cell=None) -> None:
    """The cells of ``modes`` for every format, ``--repeats`` rounds of one timed repeat per format. A static
    cell's first round compiles that format's graphs (every format's stay resident, so later rounds replay
    them); its cache is kept per format for the rounds and the profile. ``on_cell()`` runs after each cell."""
    l1, l2 = args.new_tokens
    keeps: dict[tuple[str, str], dict] = {}
    cells = []
    if "prefill" in modes:
        for (b, sq), name in zip(args.prefill_shapes, args.prefill):
            cells.append(("prefill", name, lambda model, fmt, b=b, sq=sq: time_prefill(model, b, sq, 1, args.seed)))
    for mode in ("eager", "static"):
        if mode in modes:
            for b in args.batches:
                cells.append((mode, f"b{b}", lambda model, fmt, b=b, mode=mode: time_decode(
                    model, mode, b, args.prompt_len, l1, l2, 1, args.seed,
                    keeps.setdefault((fmt, f"b{b}"), {}) if mode == "static" else None)))
    for mode, sub, fn in cells:
        active = []
        for fmt in models:
            f = m["formats"][fmt]
            if _skipped(key, fmt, mode, sub, args):
                f.setdefault(mode, {})[sub] = {"skipped": "--skip"}
            elif not budget.allows(_estimate(estimates, key, mode, sub) * (len(active) + 1)):
                f.setdefault(mode, {})[sub] = {"skipped": "budget"}
            else:
                active.append(fmt)
        rounds: dict[str, list[dict]] = {fmt: [] for fmt in active}
        for r in range(max(1, args.repeats)):
            for fmt in active if r % 2 == 0 else active[::-1]:
                if rounds[fmt] and "error" in rounds[fmt][-1]:
                    continue
                res = _run_cell(lambda: fn(models[fmt], fmt), f"{key} {fmt} {mode} {sub} (round {r + 1})", budget,
                                device)
                rounds[fmt].append(res)
        for fmt in active:
            failed = [x for x in rounds[fmt] if "error" in x]
            res = failed[0] if failed else _merge_rounds(mode, rounds[fmt])
            estimates[(key, mode, sub)] = res["cell_s"]
            m["formats"][fmt].setdefault(mode, {})[sub] = res
            if mode == "static" and "error" not in res:
                _maybe_profile(models[fmt], key, fmt, m["formats"][fmt], int(sub[1:]), res,
                               keeps.get((fmt, sub), {}), args, budget, estimates, device)
        if on_cell is not None:
            on_cell()
    keeps.clear()


def _run_format(model, key, fmt, f, args, budget, estimates, device, modes) -> None:
    """The cells of ``modes`` for one format, one after the other."""
    l1, l2 = args.new_tokens

    def cell(mode, sub, fn):
        if _skipped(key, fmt, mode, sub, args):
            f.setdefault(mode, {})[sub] = {"skipped": "--skip"}
            return None
        if not budget.allows(_estimate(estimates, key, mode, sub)):
            f.setdefault(mode, {})[sub] = {"skipped": "budget"}
            return None
        r = _run_cell(fn, f"{key} {fmt} {mode} {sub}", budget, device)
        estimates[(key, mode, sub)] = r["cell_s"]
        f.setdefault(mode, {})[sub] = r
        return r

    if "prefill" in modes:
        for (b, sq), name in zip(args.prefill_shapes, args.prefill):
            cell("prefill", name, lambda b=b, sq=sq: time_prefill(model, b, sq, args.repeats, args.seed))
    for mode in ("eager", "static"):
        if mode not in modes:
            continue
        for b in args.batches:
            keep = {}
            r = cell(mode, f"b{b}", lambda b=b, mode=mode, keep=keep: time_decode(
                model, mode, b, args.prompt_len, l1, l2, args.repeats, args.seed, keep))
            if mode == "static" and r is not None and "error" not in r:
                _maybe_profile(model, key, fmt, f, b, r, keep, args, budget, estimates, device)
            keep.clear()


def _maybe_profile(model, key, fmt, f, b, r, keep, args, budget, estimates, device) -> None:
    """The profile of a static cell ``r`` (batch ``b``) when ``--profile`` names its model and format and ``b``
    is ``--profile-batch``, on the cell's cache."""
    l1, l2 = args.new_tokens
    if f"{key}:{fmt}" not in args.profile_cells or b != args.profile_batch or keep.get("cache") is None:
        return
    if device.type != "cuda":
        f["profile"] = {"skipped": "profiling splits GPU time; CUDA only"}
        return
    if not budget.allows(estimates.get((key, "profile", ""), 0.0)):
        f["profile"] = {"skipped": "budget"}
        return
    _log(budget, f"{key} {fmt} profile static b{b}")
    t0 = time.perf_counter()
    try:
        f["profile"] = profile_decode(model, keep["cache"], keep["prompt"], l1, l2)
        f["profile"]["unprofiled_step_ms"] = r.get("step_ms")
        f["profile"]["batch"] = b
        f["profile"]["host"] = host_profile_decode(model, keep["cache"], keep["prompt"], l1, l2)
    except Exception as e:  # noqa: BLE001 - the timings stand without the profile
        prof = f.get("profile")  # a failed host split keeps the GPU split
        f["profile"] = {**prof, **_error(e)} if isinstance(prof, dict) and "per_step_ms" in prof else _error(e)
    if "error" in f["profile"]:
        _log(budget, f"{key} {fmt} profile: {f['profile']['error']}")
    estimates[(key, "profile", "")] = time.perf_counter() - t0


def _amdahl(m: dict) -> None:
    """Bounds for every sparse format from the dense profile: its step with the GEMM bucket (projections +
    lm_head) shrunk by the bucket's weight-byte ratio, next to the measured static ratio at the profile's batch."""
    fm = m["formats"]
    dense = fm.get("dense") or {}
    prof = dense.get("profile")
    if not isinstance(prof, dict) or "per_step_ms" not in prof or not dense.get("weight_bytes"):
        return
    step = prof["per_step_ms"]
    am = amdahl_bounds(step)
    am["dense_step_ms"] = step
    am["batch"] = batch = prof.get("batch", 1)
    am["formats"] = {}
    dwb = dense["weight_bytes"]
    d_static = ((dense.get("static") or {}).get(f"b{batch}") or {}).get("tok_s")
    for fmt, f in fm.items():
        wb = f.get("weight_bytes")
        if fmt == "dense" or not wb:
            continue
        ratio = (wb["projections"] + wb["lm_head"]) / (dwb["projections"] + dwb["lm_head"])
        b = amdahl_bounds(step, ratio)
        s = ((f.get("static") or {}).get(f"b{batch}") or {}).get("tok_s")
        b["measured_static"] = s / d_static if s and d_static else None
        am["formats"][fmt] = b
    m["amdahl"] = am


if __name__ == "__main__":
    main()
