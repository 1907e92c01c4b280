"""``torch.ops.venom.spmm``: y = x @ W^T (+ bias) for a V:2:M weight in the canonical packed layout.

The CUDA path runs the Spatha kernels of csrc/spatha.cuh (built by NVRTC, see nvrtc.py) directly on the
canonical tensors of docs/format.md (no weight re-layout, no cache of derived tensors):
* decode (<= 16 tokens): the v5 ring kernel (weights through a per-warp cp.async ring, K split among a
  CTA's warps), the v4 register weight-stream kernel where the H100 sweep says it wins, v2 as fallback;
* 17-64 tokens: the v2 kernel;
* prefill (>= 65 tokens): one K-major copy of the activations per call (x^T) + the kt gather kernel.
Everything else (CPU, fp32, compute capability < 8.0, no NVRTC, V not a multiple of 16, ...) runs the
reference of venom_hf.format (unpack + F.linear).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..format import VNMSpec, unpack_tensors
from . import configs as _cfg
from . import nvrtc as _nvrtc


class _SpmmParams(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("columns", ctypes.c_void_p),
        ("meta", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("ws", ctypes.c_void_p),
        ("ldx", ctypes.c_longlong),
        ("ldy", ctypes.c_longlong),
        ("T", ctypes.c_int),
        ("K", ctypes.c_int),
        ("R", ctypes.c_int),
        ("Rp", ctypes.c_int),
        ("Gp", ctypes.c_int),
        ("V", ctypes.c_int),
        ("M", ctypes.c_int),
        ("steps_per_split", ctypes.c_int),
        ("nsplit", ctypes.c_int),
        ("counters", ctypes.c_void_p),
    ]


class _TransposeParams(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("xt", ctypes.c_void_p),
        ("ldx", ctypes.c_longlong),
        ("ldt", ctypes.c_longlong),
        ("T", ctypes.c_int),
        ("K", ctypes.c_int),
        ("Kp", ctypes.c_int),
    ]


class _ReduceParams(ctypes.Structure):
    _fields_ = [
        ("ws", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("ldy", ctypes.c_longlong),
        ("T", ctypes.c_int),
        ("R", ctypes.c_int),
        ("nsplit", ctypes.c_int),
    ]


_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_DEV_INFO: dict[int, tuple[str, int, int]] = {}


def _device_info(index: int) -> tuple[str, int, int]:
    """(arch, SM count, max opt-in shared memory per block) of a CUDA device."""
    info = _DEV_INFO.get(index)
    if info is None:
        p = torch.cuda.get_device_properties(index)
        smem = int(getattr(p, "shared_memory_per_block_optin", 0) or 99 * 1024)
        info = (f"sm_{p.major}{p.minor}", int(p.multi_processor_count), smem)
        _DEV_INFO[index] = info
    return info


def is_available(device=None) -> bool:
    """True when the Spatha CUDA kernel can run on ``device`` (default: the current CUDA device):
    a CUDA GPU of compute capability >= 8.0 and NVRTC importable through cuda-python."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(idx) < (8, 0):
        return False
    return _nvrtc.nvrtc_available()


def require_available(device=None) -> None:
    """Raise a RuntimeError that says what is missing when the kernel cannot run."""
    if not torch.cuda.is_available():
        raise RuntimeError("venom_hf Spatha kernel: no CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    cc = torch.cuda.get_device_capability(idx)
    if cc < (8, 0):
        raise RuntimeError(f"venom_hf Spatha kernel needs compute capability >= 8.0 (mma.sp), device has {cc}")
    _nvrtc._import_cuda()  # raises NVRTCUnavailable with the install hint
    if not _nvrtc.nvrtc_available():
        raise _nvrtc.NVRTCUnavailable("cuda-python imports but NVRTC does not load: pip install nvidia-cuda-nvrtc")


# --------------------------------------------------------------------------------------------- reference
def spmm_reference(x, values, columns, meta, bias, v: int, m: int, out_features: int) -> torch.Tensor:
    """unpack + F.linear in x's dtype (the CPU path and the fallback)."""
    K = x.shape[-1]
    w = unpack_tensors(values, columns, meta, (out_features, K), VNMSpec(v, 2, m)).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------------------------- dispatch
def _cuda_supported(x, values, columns, meta, bias, v, m, out_features) -> bool:
    if x.device.type != "cuda" or x.dtype not in _KERNEL_DTYPES or values.dtype != x.dtype:
        return False
    if not (values.device == columns.device == meta.device == x.device):
        return False
    if bias is not None and bias.device != x.device:
        return False
    if v % 16 != 0 or not (4 <= m <= 256) or x.shape[-1] < 1 or out_features < 1:
        return False
    Rp, Gp = values.shape[0], values.shape[1]
    if Rp % v or Gp % 8 or Gp * m < x.shape[-1] or Rp < out_features:
        return False
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    ok = _AVAILABLE.get(idx)
    if ok is None:  # per device, once: the per-call cost of this op matters at decode
        ok = _AVAILABLE[idx] = is_available(x.device)
    return ok


_AVAILABLE: dict[int, bool] = {}


def _on_device(idx: int):
    """torch.cuda.device(idx) only when it is not already current (the context manager costs us)."""
    return contextlib.nullcontext() if torch.cuda.current_device() == idx else torch.cuda.device(idx)


# Prefill (T > 16): from KT_MIN_TOKENS tokens the v3 kt kernel (x^T gather) first, by V; below that, and
# where no kt config fits (V = 16), the v2 configs. Chosen from the H100 sweep of run 6
# (benchmarks/spmm.py --sweep, docs/perf-notes.md): kt64x128k2 beat kt64x128 by 0-12 % in 9 of 11
# cases (8 % slower on 768x768 / 128 tok), kt128x128 beat the 64-row tiles at V = 128 (200 vs 220 us),
# v2 huge64 beat every kt config at 64 tokens (11008x4096: 44.7 vs 67.3 us), kt won from 128 tokens.
KT_MIN_TOKENS = 65
_PREFILL_KT = {128: ["kt128x128", "kt64x128k2"], 64: ["kt64x128k2"], 32: ["kt32x128"]}
# v3.2 sweep (run 8): BN = 256 tokens wins from 2048 tokens on big layers (4096x4096 64:2:8 152 vs 175 us,
# 64:2:16 90 vs 101, 8192 tok 578 vs 623) and loses below 2048 tokens or on small layers.
KT_WIDE_MIN_TOKENS = 2048
KT_WIDE_MIN_WEIGHTS = 4096 * 4096
_PREFILL_V2 = ["huge64", "large64", "large32", "large16"]


# kt128x128 (V % 128 == 0) only from KT_WIDE_MIN_TOKENS tokens and with at least this many CTAs per SM: the
# run-15 cold fp16 table (docs/results/spmm_v52_cold_fp16_h100.json, perf-notes session 5) has it 3-19 %
# faster than kt64x128k2 / kt64x256 on Llama-7B shapes at >= 2048 tokens, but up to 2.2x slower below 2048
# tokens (Llama-7B qkvo 512 tok: 67.6 vs 46.3 us)
# and on small layers whose 128-row tiles leave the GPU short of CTAs (BERT qkvo 2048 tok: 29.7 vs 14.1 us).
KT128_MIN_CTAS_PER_SM = 2.0


def _prefill_order(T: int, v: int, m: int, Rp: int = 0, K: int = 0, num_sms: int = 132) -> list:
    B = _cfg.BY_NAME
    kt = next((names for vv, names in _PREFILL_KT.items() if v % vv == 0), []) if T >= KT_MIN_TOKENS else []
    if kt and kt[0] == "kt128x128" and not (
            T >= KT_WIDE_MIN_TOKENS and math.ceil(Rp / 128) * math.ceil(T / 128) >= KT128_MIN_CTAS_PER_SM * num_sms):
        kt = kt[1:]
    if kt and v % 128 and v % 64 == 0 and T >= KT_WIDE_MIN_TOKENS and Rp * K >= KT_WIDE_MIN_WEIGHTS:
        kt = ["kt64x256"] + kt
    return [B[n] for n in kt] + [B[n] for n in _PREFILL_V2]


def _split(cfg, kw: int, T: int, Rp: int, nsteps: int, num_sms: int) -> tuple[int, int]:
    """(split count, k-steps per split): split-K when the tiles alone leave SMs idle."""
    ctas = math.ceil(Rp / cfg.bm) * math.ceil(T / cfg.bn)
    split = 1
    if ctas < num_sms:
        split = min(math.ceil(2 * num_sms / ctas), max(1, nsteps // (2 * kw)), 32)
    if cfg.kernel == "kt":
        split = max(split, math.ceil(nsteps / _cfg.KT_MAX_STEPS))
    steps = math.ceil(nsteps / split)
    steps = math.ceil(steps / kw) * kw  # whole windows per split
    split = math.ceil(nsteps / steps)
    return split, steps


# Decode (T <= 16): the v4 stream kernel. Its K split is the only tuning knob: enough CTAs to keep
# loads in flight on every SM, but few enough that the fp32 partials (written and read once per split,
# 8*NT tokens per row) stay small next to the weight bytes (5 B per row and column group).
STREAM_CTAS_PER_SM = 1.0  # H100 sweep (run 8): 1.0 best or equal to 2 and 4 for every decode case
STREAM_SMEM_CAP = 100 * 1024  # two CTAs per SM
STREAM_PARTIAL_SHARE = 0.25   # partial-sum bytes <= this share of the weight bytes


# "Small" layers at decode (run-10 sweep): below these padded row counts the ring kernel's 16-row CTAs
# (1 x 8 warps splitting K) fill the GPU best at <= 8 tokens, and 32-row ones at 9-16 tokens.
RING_SMALL_ROWS = 2048
RING_SMALL_ROWS_16 = 4096


# 1 token on a tall layer with K <= this: the ring kernel with x pre-gathered per V-block (v5.1/v5.2,
# ring_n1r1sel). Cold-weight sweeps of runs 11 and 13 (docs/perf-notes.md, session 5): 4-10 % faster than
# ring_n1r1 at K = 4096 (4096 to 22016 rows), 7 % slower at K = 11008 (its pre-gathered x grows with K).
RING_SEL_MAX_K = 4096


def _decode_order(T: int, Rp: int, v: int, m: int, K: int = 0) -> list:
    """Decode tile configs, best first (H100, runs 10-11, docs/perf-notes.md v5/v5.1). The v5 ring kernel for 1-2
    tokens (32-row CTAs of 2 row warps x 4 k-split warps; at 1 token and K <= RING_SEL_MAX_K its variant with
    x pre-gathered per V-block), for small layers at any decode size, and for
    9-16 tokens on tall layers (128-row CTAs: x staged once per 128 rows instead of per 32). The v4 stream
    kernel where it measured faster: 1-2 tokens on > 4096-row layers at M >= 16, 9-16 tokens on <= 4096-row
    layers at M >= 16, and 3-8 tokens on tall layers (128-row ring CTAs won the isolated-layer sweep there
    but lost the Llama-7B-shaped batch-8 decode step: 1.33x vs 1.49x dense, eager). The rest is the
    fallback order."""
    B = _cfg.BY_NAME
    v4_small = [B["stream_n1r1"]] if v % 32 else [B["stream_n1r2"], B["stream_n1r1"]]
    if T <= 8:
        if Rp < RING_SMALL_ROWS:
            first = [B["ring_n1r1k8"]]
        elif T == 1 and 0 < K <= RING_SEL_MAX_K:
            first = [B["ring_n1r1sel"]]
        elif T <= 2 and not (m >= 16 and Rp > 4096):
            first = [B["ring_n1r1"]]
        else:
            first = v4_small
    elif Rp < RING_SMALL_ROWS_16:
        first = [B["ring_n2r1"]]
    elif m >= 16 and Rp <= 4096:
        first = [B["stream_n2r1"]]
    else:
        first = [B["ring_n2r2w8"]]
    rest = [B[n] for n in ("ring_n1r1", "ring_n2r1", "stream_n1r1", "stream_n2r1", "decode16x8", "decode16")]
    return first + [c for c in v4_small + rest if c not in first]


def _stream_split(cfg, Rp: int, nsteps: int, m: int, num_sms: int, max_smem: int) -> tuple[int, int]:
    """(split count, k-steps per split) of the stream kernel; (0, 0) when one pair's x chunk does not fit."""
    cap = min(max_smem, STREAM_SMEM_CAP)
    if cfg.smem_bytes(m, 2, 2) > cap:
        return 0, 0
    row_ctas = math.ceil(Rp / cfg.bm)
    nt = cfg.bn // 8
    # small layers are latency bound: a few splits always allowed, whatever their share of the traffic
    by_traffic = max(4, int(STREAM_PARTIAL_SHARE * 5 * 8 * nsteps / (64 * nt)))
    split = max(1, min(math.ceil(STREAM_CTAS_PER_SM * num_sms / row_ctas), nsteps // 4, by_traffic, 64))
    return _pair_steps(cfg, nsteps, split, m, cap)


def _pair_steps(cfg, nsteps: int, split: int, m: int, cap: int, T: int = 0) -> tuple[int, int]:
    """(split count, k-steps per split) of the decode kernels for a wanted split: whole pairs of k-steps per
    split, fewer per split (more splits) until the CTA's shared memory fits ``cap``."""
    steps = math.ceil(nsteps / split)
    steps += steps % 2
    while steps > 2 and cfg.smem_bytes(m, 2, steps, T) > cap:
        steps -= 2
    return math.ceil(nsteps / steps), steps


# v5 ring kernel: the rows alone usually give enough CTAs (K is split among a CTA's warps); a global
# split (one launch, as v4) only where the row CTAs are fewer than this share of the SMs, or where the
# x chunk of the whole K does not fit next to the ring.
RING_CTAS_PER_SM = 1.0


def _ring_split(cfg, T: int, Rp: int, nsteps: int, m: int, num_sms: int, max_smem: int) -> tuple[int, int]:
    """(split count, k-steps per split) of the ring kernel; (0, 0) when one pair's x chunk does not fit."""
    cap = min(max_smem, STREAM_SMEM_CAP)
    if cfg.smem_bytes(m, 2, 2, T) > cap:
        return 0, 0
    row_ctas = math.ceil(Rp / cfg.bm)
    # every k-split warp keeps at least one pair of k-steps
    split = max(1, min(round(RING_CTAS_PER_SM * num_sms / row_ctas), nsteps // (2 * cfg.warps_n), 64))
    return _pair_steps(cfg, nsteps, split, m, cap, T)


_CHOICES: dict[tuple, tuple] = {}


def choose_config(T: int, Rp: int, Gp: int, v: int, m: int, num_sms: int, max_smem: int, name: str | None = None):
    """(tile config, KW, split count, k-steps per split) for one call, or (None, ...) when no shipped
    instance fits. ``name`` (or $VENOM_HF_SPMM_CONFIG) forces a tile config.

    Memoized (a decode step asks the same few questions every token, and the search costs a few us of
    Python per call); the key holds the module's tunables too, so changing one (tests, the sweep) is seen.
    """
    name = name or os.environ.get("VENOM_HF_SPMM_CONFIG") or None
    key = (T, Rp, Gp, v, m, num_sms, max_smem, name, STREAM_CTAS_PER_SM, STREAM_SMEM_CAP, STREAM_PARTIAL_SHARE,
           RING_CTAS_PER_SM, RING_SMALL_ROWS, RING_SMALL_ROWS_16, RING_SEL_MAX_K, KT_MIN_TOKENS, KT_WIDE_MIN_TOKENS,
           KT_WIDE_MIN_WEIGHTS, KT128_MIN_CTAS_PER_SM)
    choice = _CHOICES.get(key)
    if choice is None:
        if len(_CHOICES) >= 4096:  # many distinct prefill lengths: start over rather than grow
            _CHOICES.clear()
        choice = _CHOICES[key] = _search_config(T, Rp, Gp, v, m, num_sms, max_smem, name)
    return choice


def _search_config(T: int, Rp: int, Gp: int, v: int, m: int, num_sms: int, max_smem: int, name: str | None):
    B = _cfg.BY_NAME
    if name:
        order = [B[name]]
    elif T <= 16:  # decode: the v5 ring / v4 stream kernels, the v2 decode tiles as fallback
        order = _decode_order(T, Rp, v, m, Gp * m)
    else:
        order = _prefill_order(T, v, m, Rp, Gp * m, num_sms)
    order += [B["decode16"]]
    nsteps = Gp // 8
    for c in order:
        if c.kernel in ("stream", "ring"):
            if v % c.wm or T > c.bn:
                continue
            if c.kernel == "ring":
                split, steps = _ring_split(c, T, Rp, nsteps, m, num_sms, max_smem)
            else:
                split, steps = _stream_split(c, Rp, nsteps, m, num_sms, max_smem)
            if steps:
                return c, 2, split, steps
            continue
        if c.kernel == "kt":
            if v % c.bm:
                continue
            kw = c.kw_fixed
            split, steps = _split(c, kw, T, Rp, nsteps, num_sms)
            if steps > _cfg.KT_MAX_STEPS or c.smem_bytes(m, kw, steps) > max_smem:
                continue
            return c, kw, split, steps
        if v % c.wm:
            continue
        for kw in [k for k in _cfg.KWS if k <= _cfg.kw_for(m)]:
            if c.smem_bytes(m, kw) <= max_smem:
                split, steps = _split(c, kw, T, Rp, nsteps, num_sms)
                return c, kw, split, steps
    return None, 1, 1, 0


def _launch_transpose(mod, expr: str, x2: torch.Tensor, ldx: int, stream: int, kp: int = 0,
                      align: int = 8) -> torch.Tensor:
    """x2 (T, K) with row stride ldx -> x^T (max(K, kp), roundup(T, align)), padding rows/tokens zero
    (spatha_transpose). The kt kernel asks for kp = Gp*M rows and align = its token tile, so that its
    gathers never leave the buffer and need no bounds checks."""
    T, K = x2.shape
    kp = max(K, kp)
    ldt = ((T + align - 1) // align) * align
    xt = torch.empty((kp, ldt), dtype=x2.dtype, device=x2.device)
    tp = _TransposeParams(x2.data_ptr(), xt.data_ptr(), ldx, ldt, T, K, kp)
    mod.launch(expr, (math.ceil(kp / 64), math.ceil(ldt / 64), 1), (256, 1, 1), 0, stream, tp)
    return xt


def transpose_kmajor(x: torch.Tensor) -> torch.Tensor:
    """The v3 prefill transpose alone (for tests and benchmarks): x (T, K) fp16/bf16 CUDA, unit column
    stride, ldx % 8 == 0 and 16-byte aligned -> x^T (K, roundup(T, 8))."""
    T, K = x.shape
    assert x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    arch = _device_info(idx)[0]
    with _on_device(idx):
        mod = _nvrtc.get_module([_cfg.TRANSPOSE_EXPR], arch, idx)
        return _launch_transpose(mod, _cfg.TRANSPOSE_EXPR, x, x.stride(0), torch.cuda.current_stream(idx).cuda_stream)


STREAM_TILE_BYTES = 1280  # one (16-row tile, pair of k-steps): values of rows g / g+8 [32][16 B] x 2 + meta [32][8 B]


def stream_tiles(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The packed weight in STREAM order, for the experimental ``TILED`` ring config (``ring_n1r1selt``):
    (Rp/16, ceil(Gp/16), 1280) uint8, where chunk (t, u) holds exactly the bytes that the warp owning rows
    16t..16t+15 copies into one ring slot for pair u (groups 16u..16u+15), at the same offsets: lane
    (g, tig) = 4g + tig has the 16 value bytes of row 16t+g, groups 16u+4tig..+3 at 16*lane, those of row
    16t+8+g at 512 + 16*lane, and the 8 metadata bytes of row 16t+8*(tig>>1)+g, groups 16u+8*(tig&1)..+7 at
    1024 + 8*lane. Groups past Gp are zero. Pure torch (any device); a full copy of the weight."""
    Rp, Gp = meta.shape
    if values.shape[:2] != (Rp, Gp) or Rp % 16:
        raise ValueError(f"stream_tiles: values {tuple(values.shape)} and meta {tuple(meta.shape)} do not match "
                         "a packed V:2:M weight with a multiple of 16 rows")
    npairs = (Gp + 15) // 16
    vb = values.contiguous().view(torch.uint8).reshape(Rp, Gp, 4)
    mb = meta.contiguous()
    if npairs * 16 != Gp:
        vb = torch.nn.functional.pad(vb, (0, 0, 0, npairs * 16 - Gp))
        mb = torch.nn.functional.pad(mb, (0, npairs * 16 - Gp))
    # values: (tile, half, g, pair, tig, group-in-4, byte) -> (tile, pair, half, g, tig, group-in-4, byte)
    vt = vb.reshape(Rp // 16, 2, 8, npairs, 4, 4, 4).permute(0, 3, 1, 2, 4, 5, 6).reshape(Rp // 16, npairs, 1024)
    # meta: (tile, h, g, pair, pp, j) -> (tile, pair, g, h, pp, j): lane = 4g + 2h + pp
    mt = mb.reshape(Rp // 16, 2, 8, npairs, 2, 8).permute(0, 3, 2, 1, 4, 5).reshape(Rp // 16, npairs, 256)
    return torch.cat([vt, mt], dim=-1).contiguous()


def _spmm_cuda(x, values, columns, meta, bias, v, m, out_features, config: str | None = None,
               tiles: torch.Tensor | None = None):
    """The CUDA path. ``config`` forces a tile config; ``tiles`` (``stream_tiles(values, meta)``) is required
    by, and only used with, the experimental TILED configs."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    R = out_features
    if T == 0:
        return x.new_empty((*lead, R))
    ldx = x2.stride(0) if T > 1 else ((K + 7) // 8) * 8
    if ldx % 8 or x2.data_ptr() % 16:
        # rare (K % 8 != 0 or an odd view): one padded copy so rows are 16-byte aligned
        xp = torch.zeros((T, ((K + 7) // 8) * 8), dtype=x.dtype, device=x.device)
        xp[:, :K] = x2
        x2, ldx = xp, xp.stride(0)
    values = values if values.is_contiguous() else values.contiguous()
    columns = columns if columns.is_contiguous() else columns.contiguous()
    meta = meta if meta.is_contiguous() else meta.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype)
        bias = bias if bias.is_contiguous() else bias.contiguous()
    if values.data_ptr() % 16:
        values = values.clone()
    if columns.data_ptr() % 16:
        columns = columns.clone()
    if meta.data_ptr() % 16:
        meta = meta.clone()
    Rp, Gp = values.shape[0], values.shape[1]
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    arch, num_sms, max_smem = _device_info(idx)
    cfg, kw, split, steps = choose_config(T, Rp, Gp, v, m, num_sms, max_smem, config)
    if cfg is not None and cfg.kernel == "kt" and Gp * m * (math.ceil(T / cfg.bn) * cfg.bn) >= 2**31:
        # the kt gathers use 32-bit offsets into x^T: a > 2^31-element x^T takes the v2 kernel
        cfg, kw, split, steps = choose_config(T, Rp, Gp, v, m, num_sms, max_smem, "huge64")
    if cfg is None:
        return spmm_reference(x, values, columns, meta, bias, v, m, out_features)
    y = torch.empty((T, R), dtype=x.dtype, device=x.device)
    bf16 = x.dtype == torch.bfloat16
    kt = cfg.kernel == "kt"
    stream_k = cfg.kernel in ("stream", "ring")
    if stream_k:
        wptr = values.data_ptr()
        if cfg.tiled:
            want = (Rp // 16, (Gp + 15) // 16, STREAM_TILE_BYTES)
            if tiles is None or tuple(tiles.shape) != want or tiles.dtype != torch.uint8 or not tiles.is_contiguous() \
                    or tiles.device != values.device:
                raise ValueError(f"config {cfg.name} reads the weight in stream order: pass "
                                 f"tiles=stream_tiles(values, meta), a contiguous uint8 tensor of shape {want} on "
                                 f"{values.device}")
            wptr = tiles.data_ptr()
        return _launch_stream(cfg, split, steps, x2, ldx, values, columns, meta, bias, v, m, y, idx, arch, bf16, lead,
                              wptr)
    ws = torch.empty((split, T, R), dtype=torch.float32, device=x.device) if split > 1 else None
    with _on_device(idx):
        stream = torch.cuda.current_stream(idx).cuda_stream
        exprs = [cfg.expr(bf16, kw), _cfg.reduce_expr(bf16)] + ([_cfg.TRANSPOSE_EXPR] if kt else [])
        mod = _nvrtc.get_module(exprs, arch, idx)
        xk, ldk = x2, ldx
        if kt:
            # v3 prefill: one K-major copy x^T (K, roundup(T, 8)) per call, then 16-byte row gathers
            xk = _launch_transpose(mod, exprs[2], x2, ldx, stream, kp=Gp * m, align=cfg.bn)
            ldk = xk.stride(0)
        p = _SpmmParams(
            xk.data_ptr(), values.data_ptr(), columns.data_ptr(), meta.data_ptr(),
            bias.data_ptr() if bias is not None else None, y.data_ptr(),
            ws.data_ptr() if ws is not None else None,
            ldk, R, T, K, R, Rp, Gp, v, m, steps, split,
        )
        grid = (math.ceil(Rp / cfg.bm), math.ceil(T / cfg.bn), split)
        mod.launch(exprs[0], grid, (cfg.threads, 1, 1), cfg.smem_bytes(m, kw, steps), stream, p)
        if split > 1:
            rp = _ReduceParams(ws.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(), R, T, R, split)
            n = T * R
            blocks = min(math.ceil(n / 256), num_sms * 8)
            mod.launch(exprs[1], (blocks, 1, 1), (256, 1, 1), 0, stream, rp)
    return y.view(*lead, R)


_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _counters(device: torch.device, stream: int, n: int) -> torch.Tensor:
    """Arrival counters of the stream kernel's one-launch split-K, one buffer per (device, stream): zero
    between launches (the last CTA of each row group resets its counter), so consecutive launches on one
    stream can share it; launches on different streams must not."""
    key = (device.index, stream)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = c
    return c


def _launch_stream(cfg, split, steps, x2, ldx, values, columns, meta, bias, v, m, y, idx, arch, bf16, lead,
                   wptr: int | None = None):
    T, K = x2.shape
    R = y.shape[1]
    Rp, Gp = values.shape[0], values.shape[1]
    row_ctas = math.ceil(Rp / cfg.bm)
    ws = torch.empty(split * row_ctas * cfg.bm * cfg.bn, dtype=torch.float32, device=x2.device) if split > 1 else None
    with _on_device(idx):
        stream = torch.cuda.current_stream(idx).cuda_stream
        cnt = _counters(x2.device, stream, row_ctas) if split > 1 else None
        expr = cfg.expr(bf16, 2)
        mod = _nvrtc.get_module([expr], arch, idx)
        p = _SpmmParams(
            x2.data_ptr(), wptr if wptr is not None else values.data_ptr(), columns.data_ptr(), meta.data_ptr(),
            bias.data_ptr() if bias is not None else None, y.data_ptr(),
            ws.data_ptr() if ws is not None else None,
            ldx, R, T, K, R, Rp, Gp, v, m, steps, split,
            cnt.data_ptr() if cnt is not None else None,
        )
        mod.launch(expr, (row_ctas, split, 1), (cfg.threads, 1, 1), cfg.smem_bytes(m, 2, steps, T), stream, p)
    return y.view(*lead, R)


@torch.library.custom_op("venom::spmm", mutates_args=())
def spmm_op(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    meta: torch.Tensor,
    bias: Optional[torch.Tensor],
    v: int,
    m: int,
    out_features: int,
) -> torch.Tensor:
    if _cuda_supported(x, values, columns, meta, bias, v, m, out_features):
        return _spmm_cuda(x, values, columns, meta, bias, v, m, out_features)
    return spmm_reference(x, values, columns, meta, bias, v, m, out_features).contiguous()


@spmm_op.register_fake
def _spmm_fake(x, values, columns, meta, bias, v, m, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def spmm(x, values, columns, meta, bias, v: int, m: int, out_features: int) -> torch.Tensor:
    """y = x @ W^T (+ bias) for W (out_features x K, V:2:M) in the canonical packed layout.

    x: (..., K) fp16/bf16 on CUDA for the kernel (any dtype/device via the reference); returns
    (..., out_features) in x.dtype. values (Rp, Gp, 2), columns (Rb, Gp, 4) uint8, meta (Rp, Gp) uint8.
    """
    return torch.ops.venom.spmm(x, values, columns, meta, bias, int(v), int(m), int(out_features))
