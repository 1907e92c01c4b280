"""``torch.ops.venom.spmm``: y = x @ W^T (+ bias) for a V:2:M weight in the canonical packed layout.

The CUDA path runs the Spatha kernels of csrc/spatha.cuh (built by NVRTC, see nvrtc.py) directly on the
canonical tensors of docs/format.md:
* decode (<= 16 tokens): the v7 TMA kernel (sm_90+) on big layers (metadata in register order,
  format.decode_meta_layout, built once per weight on its device, ``meta_layout``), the v5 ring kernel (weights through a
  per-warp cp.async ring, K split among a CTA's warps), the v4 register weight-stream kernel where the
  sweeps say it wins, v2 as fallback;
* 17-64 tokens: the v2 kernel;
* prefill (>= 65 tokens): one K-major copy of the activations per call (x^T) + the kt gather kernel; on
  sm_90 (sm_90a build), from ``WG_MIN_TOKENS`` tokens at M <= ``WG_FIRST_MAX_M`` (and at M = 16 below
  ``WG_M16_MAX_ROWS`` rows), the v8 sparse-wgmma
  kernel, which reads the weight as 2:4 through a derived "chunk layout" (format.wgmma_layout, built once
  per weight on its device, 1/8 of the dense weight's bytes, ``wg_layout``); on layers narrower than
  ``KT32_SMALL_MAX_K`` columns up to ``KT32_SMALL_MAX_TOKENS`` tokens, kt's 32-row tiles first.
That is the built-in heuristic (``_search_config``, tuned on an H100). Where the card has a measured
dispatch table (dispatch.py: shipped per card, or written by ``venom-hf tune``) with an entry for the layer
shape and token count, ``make_plan`` takes the table's config instead, if it fits the call.
Everything else (CPU, fp32, compute capability < 8.0, no NVRTC, V not a multiple of 16, ...) runs the
reference of venom_hf.format (unpack + F.linear).

Each call shape becomes a ``SpmmPlan`` (config, grids, argument structs with the weight pointers), memoized
here for the op and cached per layer by ``VNMSparseLinear`` for its eager fast path, so a decode call costs
one output allocation and one ctypes ``cuLaunchKernel`` of host time.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..format import VNMSpec, decode_meta_layout, unpack_tensors, wgmma_layout
from . import configs as _cfg
from . import dispatch as _dispatch
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


class _TmaParams(ctypes.Structure):
    """csrc/spatha.cuh TmaParams: two CUtensorMaps (128 bytes each, 64-byte aligned) and the SpmmParams,
    padded to the kernel's 64-byte struct size (the driver copies that many bytes)."""
    _fields_ = [
        ("values_map", ctypes.c_uint64 * 16),
        ("meta_map", ctypes.c_uint64 * 16),
        ("p", _SpmmParams),
        ("_pad", ctypes.c_char * ((-ctypes.sizeof(_SpmmParams)) % 64)),
    ]


class _WgParams(ctypes.Structure):
    """csrc/spatha.cuh WgParams (384 bytes): the x and values tensor maps, then the plain fields."""
    _fields_ = [
        ("x_map", ctypes.c_uint64 * 16),
        ("values_map", ctypes.c_uint64 * 16),
        ("layout", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("ws", ctypes.c_void_p),
        ("ldy", ctypes.c_longlong),
        ("T", ctypes.c_int),
        ("R", ctypes.c_int),
        ("Rp", ctypes.c_int),
        ("nks_pad", ctypes.c_int),
        ("stages_per_split", ctypes.c_int),
        ("nsplit", ctypes.c_int),
        ("log2m", ctypes.c_int),
        ("_pad", ctypes.c_char * 60),
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


def has_tma(arch: str) -> bool:
    """Whether an ``sm_XY`` architecture has the Tensor Memory Accelerator (sm_90 and later)."""
    digits = "".join(ch for ch in arch if ch.isdigit())
    return bool(digits) and int(digits) >= 90


def device_has_tma(index: int) -> bool:
    """Whether the v7 TMA decode kernel can run on a CUDA device: TMA in its architecture and the
    descriptors encodable here (libcuda through ctypes)."""
    return has_tma(_device_info(index)[0]) and _nvrtc.tensor_maps_available()


def has_wgmma(arch: str) -> bool:
    """Whether an ``sm_XY`` architecture runs the sm_90a build (``wgmma``; the ``a`` targets run on their
    own architecture only)."""
    return arch in ("sm_90", "sm_90a")


def device_has_wgmma(index: int) -> bool:
    """Whether the v8 sparse-wgmma prefill kernel can run on a CUDA device (sm_90, TMA descriptors), unless
    ``VENOM_HF_WGMMA=0`` turns it off (its per-weight chunk layouts cost 1/8 of the dense weight's bytes)."""
    if os.environ.get("VENOM_HF_WGMMA", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return has_wgmma(_device_info(index)[0]) and _nvrtc.tensor_maps_available()


WG_ARCH = "sm_90a"


_DEV_NAME: dict[int, str] = {}


def _device_name(index: int) -> str:
    name = _DEV_NAME.get(index)
    if name is None:
        name = _DEV_NAME[index] = torch.cuda.get_device_name(index)
    return name


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
# where no kt config fits (V = 16), the v2 configs. Chosen from the H100 sweep of the v3
# kernel (docs/perf-notes.md): kt64x128k2 beat kt64x128 by 0-12 % in 9 of 11
# cases (8 % slower on 768x768 / 128 tok), kt128x128 beat the 64-row tiles at V = 128 (200 vs 220 us),
# v2 huge64 beat every kt config at 64 tokens (11008x4096: 44.7 vs 67.3 us), kt won from 128 tokens.
KT_MIN_TOKENS = 65
_PREFILL_KT = {128: ["kt128x128", "kt64x128k2"], 64: ["kt64x128k2"], 32: ["kt32x128"]}
# v3.2 sweep (H100): BN = 256 tokens wins from 2048 tokens on big layers (4096x4096 64:2:8 152 vs 175 us,
# 64:2:16 90 vs 101, 8192 tok 578 vs 623) and loses below 2048 tokens or on small layers.
KT_WIDE_MIN_TOKENS = 2048
KT_WIDE_MIN_WEIGHTS = 4096 * 4096
_PREFILL_V2 = ["huge64", "large64", "large32", "large16"]


# kt128x128 (V % 128 == 0) only from KT_WIDE_MIN_TOKENS tokens and with at least this many CTAs per SM: the
# H100 cold-weight fp16 table of v5.2 (docs/perf-notes.md) has it 3-19 %
# faster than kt64x128k2 / kt64x256 on Llama-7B shapes at >= 2048 tokens, but up to 2.2x slower below 2048
# tokens (Llama-7B qkvo 512 tok: 67.6 vs 46.3 us)
# and on small layers whose 128-row tiles leave the GPU short of CTAs (BERT qkvo 2048 tok: 29.7 vs 14.1 us).
KT128_MIN_CTAS_PER_SM = 2.0


# v8 sparse-wgmma prefill kernel (sm_90a; runs M a power of two in 4..32): first in the heuristic from
# WG_MIN_TOKENS tokens for M <= WG_FIRST_MAX_M, and at M = 16 on layers of fewer than WG_M16_MAX_ROWS padded
# rows; split-K when its 256 x 128 tiles leave SMs idle. H200 cold-weight re-tune (docs/perf-notes.md, v8.1):
# at 64:2:8 1.4-2.6x the kt kernel on every Llama-3-8B layer and 1.5-2.3x on the BERT-base ones; at 64:2:16,
# where kt's gather halves the MMA work (v8's 2:4 work does not shrink with M), v8 is 1.0-2.0x kt on the
# 768-, 1024-, 4096- and 6144-row layers from 2048 tokens and kt 1.0-1.15x v8 on the 14336/28672-row ones;
# at M = 32 kt (a quarter of v8's MMA work) is 1.7-2.7x cuBLAS from 2048 tokens, above v8's time, which does
# not depend on M (1.3-1.5x at M = 8). The 4-stage config first (3 stages where 4 do not fit: M = 4).
WG_MIN_TOKENS = 128
WG_FIRST_MAX_M = 8
WG_M16_MAX_ROWS = 12288
WG_MS = (4, 8, 16, 32)

# Narrow layers (K < KT32_SMALL_MAX_K padded columns) at KT_MIN_TOKENS..KT32_SMALL_MAX_TOKENS tokens: kt32x128
# first, ahead of v8 and kt64x128k2. There every kernel is latency-bound (~8 us a call on the H200, cuBLAS
# 3-8 us) and the 32-row tiles put the most CTAs on the layer. The H200 re-tune of the SmolLM2 / Gemma-3-270M /
# BERT-base layers at 128 and 512 tokens (62 cases of K = 576-768, docs/perf-notes.md): the heuristic's time
# over the best config's, geometric mean 1.16x with v8 first, 1.06x with this rule (worst case 1.95x -> 1.34x);
# on the K >= 1024 layers v8 or kt64x128k2 stays the better first choice.
KT32_SMALL_MAX_K = 1024
KT32_SMALL_MAX_TOKENS = 512


def _wg_order() -> list:
    B = _cfg.BY_NAME
    return [B["wg256x128s4"], B["wg256x128s3"]]


def wg_stages(Gp: int, m: int) -> int:
    """128-column stages of the v8 kernel over a packed width (the chunk layout's k-steps / 4)."""
    return math.ceil(math.ceil(Gp * m / 32) / 4)


def _wg_split(cfg, T: int, Rp: int, Gp: int, m: int, num_sms: int) -> tuple[int, int]:
    """(split count, stages per split) of the v8 kernel."""
    nst = wg_stages(Gp, m)
    ctas = math.ceil(Rp / cfg.bm) * math.ceil(T / cfg.bn)
    split = 1
    if ctas < num_sms:
        split = max(1, min(num_sms // ctas, nst // 2, 16))
    steps = math.ceil(nst / split)
    return math.ceil(nst / steps), steps


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
STREAM_CTAS_PER_SM = 1.0  # H100 sweep: 1.0 best or equal to 2 and 4 for every decode case
STREAM_SMEM_CAP = 100 * 1024  # two CTAs per SM
STREAM_PARTIAL_SHARE = 0.25   # partial-sum bytes <= this share of the weight bytes


# "Small" layers at decode (H100 v5 sweep): below these padded row counts the ring kernel's 16-row CTAs
# (1 x 8 warps splitting K) fill the GPU best at <= 8 tokens, and 32-row ones at 9-16 tokens.
RING_SMALL_ROWS = 2048
RING_SMALL_ROWS_16 = 4096


# 1 token on a tall layer with K <= this: the ring kernel with x pre-gathered per V-block (v5.1/v5.2,
# ring_n1r1sel). H100 cold-weight sweeps of v5.1/v5.2 (docs/perf-notes.md): 4-10 % faster than
# ring_n1r1 at K = 4096 (4096 to 22016 rows), 7 % slower at K = 11008 (its pre-gathered x grows with K).
RING_SEL_MAX_K = 4096


# v7 TMA decode kernel (sm_90+): enough CTAs per SM to keep the copy engine busy; each CTA's TMA ring plus
# x chunk within this much shared memory (two CTAs per SM).
TMA_CTAS_PER_SM = 2.0
TMA_SMEM_CAP = 113 * 1024
# Heuristic (no table entry): the TMA kernel first for <= 8 tokens on layers of at least this many packed
# weights (Rp x Gp x M). H200 cold-weight sweep: 1.07-1.33x the v4/v5 kernels on 4096x14336 and 28672x4096
# at 1 and 8 tokens, within -10..+3 % on 4096- and 6144-row K = 4096 layers, slower on small ones (its fixed
# cost: the descriptor fetch and the first TMA round trip).
TMA_MIN_WEIGHTS = 48 * 2**20


def _tma_order(T: int) -> list:
    """TMA decode configs for a call, best first (used only on devices with TMA)."""
    B = _cfg.BY_NAME
    return [B["tma_n1r2w4"], B["tma_n1r1w4"]] if T <= 8 else [B["tma_n2r2w4"], B["tma_n2r1w4"]]


def _decode_order(T: int, Rp: int, v: int, m: int, K: int = 0) -> list:
    """Decode tile configs, best first (H100 sweeps, docs/perf-notes.md v5/v5.1). The v5 ring kernel for 1-2
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


def _pair_steps(cfg, nsteps: int, split: int, m: int, cap: int, T: int = 0, unit: int = 2) -> tuple[int, int]:
    """(split count, k-steps per split) of the decode kernels for a wanted split: whole units of k-steps per
    split (pairs; the TMA kernel: its ring stages), fewer per split (more splits) until the CTA's shared
    memory fits ``cap``."""
    steps = math.ceil(math.ceil(nsteps / split) / unit) * unit
    while steps > unit and cfg.smem_bytes(m, 2, steps, T) > cap:
        steps -= unit
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


def _tma_split(cfg, T: int, Rp: int, Gp: int, m: int, num_sms: int, max_smem: int) -> tuple[int, int]:
    """(split count, k-steps per split) of the TMA kernel: whole ring stages per split; (0, 0) when it
    cannot run this call (metadata rows not 16-byte aligned, or one stage's x chunk does not fit)."""
    if Gp % 16:
        return 0, 0
    cap = min(max_smem, TMA_SMEM_CAP)
    unit = 2 * cfg.pairs_per_stage  # k-steps per stage
    nsteps = Gp // 8
    if cfg.smem_bytes(m, 2, unit, T) > cap:
        return 0, 0
    row_ctas = math.ceil(Rp / cfg.bm)
    split = max(1, min(round(TMA_CTAS_PER_SM * num_sms / row_ctas), math.ceil(nsteps / unit), 64))
    return _pair_steps(cfg, nsteps, split, m, cap, T, unit)


_CHOICES: dict[tuple, tuple] = {}


def choose_config(T: int, Rp: int, Gp: int, v: int, m: int, num_sms: int, max_smem: int, name: str | None = None,
                  tma: bool = False, wg: bool = False):
    """(tile config, KW, split count, k-steps per split) for one call, or (None, ...) when no shipped
    instance fits. ``name`` (or $VENOM_HF_SPMM_CONFIG) forces a tile config. ``tma``: the device has the
    Tensor Memory Accelerator (sm_90+), which the v7 decode kernel needs; ``wg``: the device runs the sm_90a
    build of the v8 prefill kernel.

    Memoized (a decode step asks the same few questions every token, and the search costs a few us of
    Python per call); the key holds the module's tunables too, so changing one (tests, the sweep) is seen.
    """
    name = name or os.environ.get("VENOM_HF_SPMM_CONFIG") or None
    key = (T, Rp, Gp, v, m, num_sms, max_smem, name, tma, wg) + _tunables()
    choice = _CHOICES.get(key)
    if choice is None:
        if len(_CHOICES) >= 4096:  # many distinct prefill lengths: start over rather than grow
            _CHOICES.clear()
        choice = _CHOICES[key] = _search_config(T, Rp, Gp, v, m, num_sms, max_smem, name, tma, wg)
    return choice


def _search_config(T: int, Rp: int, Gp: int, v: int, m: int, num_sms: int, max_smem: int, name: str | None,
                   tma: bool = False, wg: bool = False):
    B = _cfg.BY_NAME
    if name:
        order = [B[name]]
    elif T <= 16:  # decode: the v7 tma (sm_90+) / v5 ring / v4 stream kernels, the v2 decode tiles as fallback
        order = _decode_order(T, Rp, v, m, Gp * m)
        if tma and T <= 8 and Rp * Gp * m >= TMA_MIN_WEIGHTS:
            order = _tma_order(T) + order
    else:
        order = _prefill_order(T, v, m, Rp, Gp * m, num_sms)
        if KT_MIN_TOKENS <= T <= KT32_SMALL_MAX_TOKENS and Gp * m < KT32_SMALL_MAX_K:
            order = [B["kt32x128"]] + [c for c in order if c is not B["kt32x128"]]
        elif wg and T >= WG_MIN_TOKENS and (m <= WG_FIRST_MAX_M or (m == 16 and Rp < WG_M16_MAX_ROWS)):
            order = _wg_order() + order
    order += [B["decode16"]]
    nsteps = Gp // 8
    for c in order:
        if c.kernel == "wg":
            if not wg or m not in WG_MS or T < 1 or c.smem_bytes(m, 1) > max_smem:
                continue
            split, steps = _wg_split(c, T, Rp, Gp, m, num_sms)
            return c, 1, split, steps
        if c.kernel == "tma":
            if not tma or v % c.wm or T > c.bn:
                continue
            split, steps = _tma_split(c, T, Rp, Gp, m, num_sms, max_smem)
            if steps:
                return c, 2, split, steps
            continue
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


def _transpose_plan(T: int, K: int, kp: int, align: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """(x^T shape, grid) of spatha_transpose: x2 (T, K) -> x^T (max(K, kp), roundup(T, align)), padding
    rows/tokens zero. The kt kernel asks for kp = Gp*M rows and align = its token tile, so that its gathers
    never leave the buffer and need no bounds checks."""
    kp = max(K, kp)
    ldt = ((T + align - 1) // align) * align
    return (kp, ldt), (math.ceil(kp / 64), math.ceil(ldt / 64), 1)


def transpose_kmajor(x: torch.Tensor) -> torch.Tensor:
    """The v3 prefill transpose alone (for tests and benchmarks): x (T, K) fp16/bf16 CUDA, unit column
    stride, ldx % 8 == 0 and 16-byte aligned -> x^T (K, roundup(T, 8))."""
    T, K = x.shape
    assert x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    arch = _device_info(idx)[0]
    with _on_device(idx):
        mod = _nvrtc.get_module([_cfg.TRANSPOSE_EXPR], arch, idx)
        shape, grid = _transpose_plan(T, K, 0, 8)
        xt = torch.empty(shape, dtype=x.dtype, device=x.device)
        tp = _TransposeParams(x.data_ptr(), xt.data_ptr(), x.stride(0), shape[1], T, K, shape[0])
        mod.launch(_cfg.TRANSPOSE_EXPR, grid, (256, 1, 1), 0, torch.cuda.current_stream(idx).cuda_stream, tp)
        return xt


# --------------------------------------------------------------------------------------------- launch plans
# Split-K arrival counters of the one-launch stream/ring kernels: zero between launches (the last CTA of each
# row group resets its counter), so consecutive launches on one stream share a buffer, and launches on
# different streams never do. The buffers are slices of one arena per device in driver memory
# (nvrtc.alloc_zeroed_words), never freed: graphs captured with a slice keep using it. The arena is made
# outside capture (the driver refuses allocations while a stream captures), when a plan that needs counters
# is made; a stream first seen during capture takes a free slice. Only when there is none (no arena yet, or
# every slice taken) does a launch take per-call zeroed counters from torch's allocator.
_SLICE_WORDS = 1 << 14  # 16K row CTAs: a 256K-row layer at 16 rows per CTA
_ARENA_SLICES = 64
_ARENAS: dict[int, list[int]] = {}  # device -> [base address, slices handed out]
_COUNTERS: dict[tuple[int, int], tuple[int, int]] = {}  # (device, stream) -> (address, words)


def _ensure_arena(idx: int) -> None:
    if idx not in _ARENAS and not torch.cuda.is_current_stream_capturing():
        _ARENAS[idx] = [_nvrtc.alloc_zeroed_words(_ARENA_SLICES * _SLICE_WORDS, idx), 0]


# Split-K partials of the one-launch stream/ring/tma kernels at decode: written and read inside one launch
# (the last-arriving CTA of a row group sums them), so consecutive launches on one stream share a workspace
# as they share counters. Eager calls take it from here instead of from torch's allocator (one allocation
# less per call: ~3-7 us of host time on the H200's host, 4 per decoder layer); while a stream captures,
# a stream not seen before takes per-call memory from the graph's pool, as before. Driver memory, never
# freed: a bigger need allocates a new buffer (at least double) and keeps the old one, which queued work or
# a captured graph may still use.
_WORKSPACES: dict[tuple[int, int], tuple[int, int]] = {}  # (device, stream) -> (address, float32 elements)


def _stream_workspace(idx: int, stream: int, numel: int) -> int | None:
    """Address of ``numel`` float32 of split-K workspace for launches on ``stream``, or None (the caller
    allocates per call)."""
    entry = _WORKSPACES.get((idx, stream))
    if entry is not None and entry[1] >= numel:
        return entry[0]
    if torch.cuda.is_current_stream_capturing():
        return None
    size = max(numel, 2 * entry[1] if entry is not None else 0, 1 << 18)
    addr = _nvrtc.alloc_bytes(4 * size, idx)
    _WORKSPACES[(idx, stream)] = (addr, size)
    return addr


def _counter_buffer(idx: int, stream: int, n: int) -> int | None:
    """Address of ``n`` zero counters for launches on ``stream``, or None (the caller allocates per call)."""
    entry = _COUNTERS.get((idx, stream))
    if entry is not None and entry[1] >= n:
        return entry[0]
    if n <= _SLICE_WORDS:
        _ensure_arena(idx)
        arena = _ARENAS.get(idx)
        if arena is not None and arena[1] < _ARENA_SLICES:
            addr = arena[0] + 4 * _SLICE_WORDS * arena[1]
            arena[1] += 1
            _COUNTERS[(idx, stream)] = (addr, _SLICE_WORDS)
            return addr
    if torch.cuda.is_current_stream_capturing():
        return None
    addr = _nvrtc.alloc_zeroed_words(n, idx)
    _COUNTERS[(idx, stream)] = (addr, n)
    return addr


# Derived per-weight layouts: the v8 kernel's chunk layout (format.wgmma_layout, kind "wg") and the v7
# kernel's metadata in register order (format.decode_meta_layout, kind "meta"). Built on first use on the
# weight's device by torch ops, then copied into driver memory (nvrtc.alloc_bytes: outside torch's allocator
# and every CUDA-graph pool, so a layout first built inside torch.compile's cudagraph warm-up may outlive it);
# freed when the ``values`` tensor it was built for is collected. Not built while a stream captures (the
# driver refuses allocations then): that call takes another kernel.
_LAYOUTS: dict[tuple, tuple] = {}  # (kind, device, addresses, ...) -> (weakref to values, address, bytes)


_PENDING_FREES: list[int] = []  # layouts whose weight died while a stream captured: freed at the next chance


def tensor_version(t: torch.Tensor) -> int:
    """The in-place modification counter of a tensor (derived layouts and the plans that hold them are keyed
    on it, so that e.g. ``load_state_dict`` into a packed layer rebuilds them); 0 for inference tensors."""
    try:
        return t._version
    except RuntimeError:
        return 0


def _free_layout(key: tuple, ptr: int) -> None:
    """Drop a layout (its ``values`` tensor died, or its columns/meta changed in place) and the memoized plans
    that use it; once per layout. The free synchronizes the device, which a capture in progress (the garbage
    collector may run inside one) does not allow: then it waits for the next layout build."""
    if _LAYOUTS.get(key, (None, None))[1] != ptr:
        return  # already dropped
    del _LAYOUTS[key]
    for k in [k for k, plan in _PLANS.items() if plan and plan.layout == ptr]:
        del _PLANS[k]
    _PENDING_FREES.append(ptr)
    _free_pending()


def _free_pending() -> None:
    try:
        if torch.cuda.is_current_stream_capturing():
            return
        while _PENDING_FREES:
            _nvrtc.free(_PENDING_FREES.pop())
    except Exception:  # interpreter shutdown: the context may be gone already
        pass


def _layout(kind: str, values: torch.Tensor, columns: torch.Tensor, meta: torch.Tensor, v: int, m: int,
            idx: int) -> int | None:
    key = (kind, idx, values.data_ptr(), columns.data_ptr(), meta.data_ptr(), tuple(values.shape), v, m,
           tensor_version(columns), tensor_version(meta))
    entry = _LAYOUTS.get(key)
    if entry is not None and entry[0]() is values:
        return entry[1]
    if torch.cuda.is_current_stream_capturing():
        return None
    if entry is not None:  # another tensor at the same addresses
        _free_layout(key, entry[1])
    for k in [k for k, e in _LAYOUTS.items() if k[:-2] == key[:-2] and e[0]() is values]:
        _free_layout(k, _LAYOUTS[k][1])  # the same weight before an in-place update: stale
    _free_pending()
    with _on_device(idx):
        if kind == "wg":
            lay = wgmma_layout(columns, meta, VNMSpec(v, 2, m), values.shape[0]).contiguous()
        else:
            lay = decode_meta_layout(meta)
        nbytes = lay.numel() * lay.element_size()
        ptr = _nvrtc.alloc_bytes(nbytes, idx)
        _nvrtc.copy_async(ptr, lay.data_ptr(), nbytes, torch.cuda.current_stream(idx).cuda_stream)
        torch.cuda.current_stream(idx).synchronize()  # once per weight: the temporary may go right after
    _LAYOUTS[key] = (weakref.ref(values), ptr, nbytes)
    weakref.finalize(values, _free_layout, key, ptr)
    return ptr


def wg_layout(values: torch.Tensor, columns: torch.Tensor, meta: torch.Tensor, v: int, m: int, idx: int) -> int | None:
    """Address of the v8 chunk layout of a packed weight on device ``idx`` (built once), or None during capture."""
    return _layout("wg", values, columns, meta, v, m, idx)


def meta_layout(values: torch.Tensor, columns: torch.Tensor, meta: torch.Tensor, v: int, m: int, idx: int
                ) -> int | None:
    """Address of the v7 register-order metadata of a packed weight on device ``idx`` (built once), or None
    during capture."""
    return _layout("meta", values, columns, meta, v, m, idx)


def layout_bytes(tensors) -> int:
    """Bytes of the derived layouts built for any of ``tensors`` (a model's parameters and buffers: a fused
    group's layouts are keyed by its first member's values address). They live in driver memory, which
    torch's memory counters do not see."""
    ptrs = {t.data_ptr() for t in tensors}
    return sum(e[2] for k, e in _LAYOUTS.items() if k[2] in ptrs and e[0]() is not None)


class SpmmPlan:
    """One ``venom::spmm`` call shape with every decision taken once: kernel, tile config, split, grids and
    the argument structs with the weight pointers filled in. ``run(x2, ldx, stream)`` allocates only the
    output (and the split-K workspace or x^T where the kernel needs them), writes the per-call pointers and
    launches. Plans hold the weights' addresses, not the tensors: a caller that caches one must check that
    the tensors it was made for are still the ones it passes (``VNMSparseLinear`` compares data pointers).
    A ``provisional`` plan was made inside a stream capture that needed a derived layout it could not build
    there; it stands in for that capture only and is not cached.
    """

    provisional = False
    layout = None  # address of the derived layout the plan's kernel reads (v8, v7), if any

    def __init__(self, cfg, kw: int, split: int, steps: int, T: int, K: int, ldx: int, dtype: torch.dtype,
                 idx: int, values, columns, meta, bias, v: int, m: int, R: int, layout: int | None = None):
        arch, num_sms, _ = _device_info(idx)
        bf16 = dtype == torch.bfloat16
        Rp, Gp = values.shape[0], values.shape[1]
        self.T, self.R, self.dtype, self.idx = T, R, dtype, idx
        self.device = torch.device("cuda", idx)
        self.kind = "stream" if cfg.decode else cfg.kernel
        self.split = split
        self.cfg = cfg
        self.layout = layout
        bptr = bias.data_ptr() if bias is not None else None
        exprs = [cfg.expr(bf16, kw)]
        if self.kind != "stream":
            exprs.append(_cfg.reduce_expr(bf16))
        if self.kind == "kt":
            exprs.append(_cfg.TRANSPOSE_EXPR)
        mod = _nvrtc.get_module(exprs, WG_ARCH if cfg.kernel == "wg" else arch, idx)
        self.main = mod.kernel(exprs[0])
        self.block = (cfg.threads, 1, 1)
        self.ws_numel = 0
        self.reduce = self.transpose = None
        self.row_ctas = 0
        if self.kind == "stream":
            self.row_ctas = math.ceil(Rp / cfg.bm)
            self.grid = (self.row_ctas, split, 1)
            self.smem = cfg.smem_bytes(m, 2, steps, T)
            if split > 1:
                self.ws_numel = split * self.row_ctas * cfg.bm * cfg.bn
                _ensure_arena(idx)
            ld_in = ldx
        else:
            self.grid = (math.ceil(Rp / cfg.bm), math.ceil(T / cfg.bn), split)
            self.smem = cfg.smem_bytes(m, kw, steps)
            if split > 1:
                self.ws_numel = split * T * R
                self.reduce = mod.kernel(exprs[1])
                self.reduce_grid = (min(math.ceil(T * R / 256), num_sms * 8), 1, 1)
                self.rp = _ReduceParams(0, bptr, 0, R, T, R, split)
                self.rp_args, self._rp_keep = _nvrtc.kernel_args(self.rp)
            ld_in = ldx
            if self.kind == "kt":
                # v3 prefill: one K-major copy x^T (Gp*M, roundup(T, BN)) per call, then 16-byte row gathers
                self.transpose = mod.kernel(exprs[2])
                self.xt_shape, self.transpose_grid = _transpose_plan(T, K, Gp * m, cfg.bn)
                self.tp = _TransposeParams(0, 0, ldx, self.xt_shape[1], T, K, self.xt_shape[0])
                self.tp_args, self._tp_keep = _nvrtc.kernel_args(self.tp)
                ld_in = self.xt_shape[1]
        self.main.reserve_smem(self.smem)
        p = _SpmmParams(0, values.data_ptr(), columns.data_ptr(), meta.data_ptr(), bptr, 0, None,
                        ld_in, R, T, K, R, Rp, Gp, v, m, steps, split, None)
        if cfg.kernel == "wg":
            # v8: the values as 32-bit words (Gp, Rp), one box of 256 rows x 128/M words per stage, swizzled by
            # its row width; the x map is encoded per call (its address changes), the rest once
            self.wg = _WgParams()
            vrow = 512 // m
            _nvrtc.encode_tensor_map_2d(self.wg.values_map, _nvrtc.TMAP_UINT32, values.data_ptr(), (Gp, Rp), 4 * Gp,
                                        (128 // m, 256), vrow if vrow >= 32 else 0)
            w = self.wg
            w.layout, w.bias, w.ldy, w.T, w.R, w.Rp = layout, bptr, R, T, R, Rp
            w.nks_pad, w.stages_per_split, w.nsplit, w.log2m = 4 * wg_stages(Gp, m), steps, split, m.bit_length() - 1
            self.x_geom = ((K, T), 2 * ldx, (64, cfg.bn))
            self.p = p  # unused by the kernel; run() writes y there as for the others
            self.p_args, self._p_keep = _nvrtc.kernel_args(self.wg)
        elif cfg.kernel == "tma":
            # the TMA descriptors over the canonical values (Rp, Gp*2) halves and the register-order metadata
            # (Rp/16, Gp/16*32) words (format.decode_meta_layout), built once
            self.tma = _TmaParams()
            self.tma.p = p
            _nvrtc.encode_tensor_map_2d(self.tma.values_map, _nvrtc.TMAP_UINT16, values.data_ptr(), (2 * Gp, Rp),
                                        4 * Gp, (32, cfg.bm))
            _nvrtc.encode_tensor_map_2d(self.tma.meta_map, _nvrtc.TMAP_UINT32, layout, (2 * Gp, Rp // 16), 8 * Gp,
                                        (32 * cfg.pairs_per_stage, cfg.bm // 16))
            self.p = self.tma.p  # a view into self.tma: run() writes the per-call pointers there
            self.p_args, self._p_keep = _nvrtc.kernel_args(self.tma)
        else:
            self.p = p
            self.p_args, self._p_keep = _nvrtc.kernel_args(self.p)
        self._launch_main = self.main.bind(self.grid, self.block, self.smem, self.p_args)
        if self.reduce is not None:
            self._launch_reduce = self.reduce.bind(self.reduce_grid, (256, 1, 1), 0, self.rp_args)
        if self.transpose is not None:
            self._launch_transpose = self.transpose.bind(self.transpose_grid, (256, 1, 1), 0, self.tp_args)
        # the argument structs are shared by the calls of this plan: one call at a time writes and launches
        self._lock = threading.Lock()

    def run(self, xptr: int, stream: int, out_shape) -> torch.Tensor:
        """y (``out_shape``, T * R elements) for x at ``xptr`` (the layout the plan was made for)."""
        y = torch.empty(out_shape, dtype=self.dtype, device=self.device)
        if self.kind == "stream":
            ws = None
            if self.split > 1:
                wsp = _stream_workspace(self.idx, stream, self.ws_numel)
                if wsp is None:  # capturing on a new stream: this call's workspace from the graph's pool
                    ws = torch.empty(self.ws_numel, dtype=torch.float32, device=self.device)
                    wsp = ws.data_ptr()
            with self._lock:
                p = self.p
                p.y, p.x = y.data_ptr(), xptr
                if self.split > 1:
                    p.ws = wsp
                    cnt = _counter_buffer(self.idx, stream, self.row_ctas)
                    if cnt is None:  # a capture with no free slice: zeroed counters of this call (graph pool)
                        counters = torch.zeros(self.row_ctas, dtype=torch.int32, device=self.device)
                        cnt = counters.data_ptr()
                    p.counters = cnt
                self._launch_main(stream)
            return y
        ws = torch.empty(self.ws_numel, dtype=torch.float32, device=self.device) if self.ws_numel else None
        with self._lock:
            p = self.p
            p.y = y.data_ptr()
            if ws is not None:
                p.ws = ws.data_ptr()
            if self.kind == "wg":
                self.wg.y = y.data_ptr()
                if ws is not None:
                    self.wg.ws = ws.data_ptr()
                dims, stride, box = self.x_geom
                _nvrtc.encode_tensor_map_2d(self.wg.x_map, _nvrtc.TMAP_UINT16, xptr, dims, stride, box, 128)
            elif self.transpose is not None:
                xt = torch.empty(self.xt_shape, dtype=self.dtype, device=self.device)
                self.tp.x, self.tp.xt = xptr, xt.data_ptr()
                self._launch_transpose(stream)
                p.x = xt.data_ptr()
            else:
                p.x = xptr
            self._launch_main(stream)
            if self.reduce is not None:
                self.rp.ws, self.rp.y = ws.data_ptr(), y.data_ptr()
                self._launch_reduce(stream)
        return y


def make_plan(T: int, K: int, ldx: int, dtype: torch.dtype, idx: int, values, columns, meta, bias, v: int, m: int,
              R: int, config: str | None = None) -> SpmmPlan | None:
    """The launch plan of one call (None when no shipped instance fits: the caller runs the reference).
    The tensors must be CUDA, contiguous and 16-byte aligned, bias None or of ``dtype``."""
    Rp, Gp = values.shape[0], values.shape[1]
    _, num_sms, max_smem = _device_info(idx)
    tma = device_has_tma(idx)
    wg = device_has_wgmma(idx)
    cfg = None
    provisional = False
    if config is None and not os.environ.get("VENOM_HF_SPMM_CONFIG"):
        tuned = _dispatch.config_for(_device_name(idx), num_sms, v, m, Rp, Gp, T)
        if tuned is not None:
            cfg, kw, split, steps = choose_config(T, Rp, Gp, v, m, num_sms, max_smem, tuned, tma, wg)
            if cfg is not None and cfg.name != tuned:  # the measured config does not fit this call
                cfg = None
    if cfg is None:
        cfg, kw, split, steps = choose_config(T, Rp, Gp, v, m, num_sms, max_smem, config, tma, wg)
    layout = None
    if cfg is not None and cfg.kernel in ("wg", "tma"):
        layout = _layout("wg" if cfg.kernel == "wg" else "meta", values, columns, meta, v, m, idx)
        if layout is None:  # capturing: the layout cannot be built now; this plan serves the capture only
            cfg, kw, split, steps = choose_config(T, Rp, Gp, v, m, num_sms, max_smem, None,
                                                  tma and cfg.kernel != "tma", wg and cfg.kernel != "wg")
            provisional = True
    if cfg is not None and cfg.kernel == "kt" and Gp * m * (math.ceil(T / cfg.bn) * cfg.bn) >= 2**31:
        # the kt gathers use 32-bit offsets into x^T: a > 2^31-element x^T takes the v2 kernel
        cfg, kw, split, steps = choose_config(T, Rp, Gp, v, m, num_sms, max_smem, "huge64", tma)
    if cfg is None:
        return None
    plan = SpmmPlan(cfg, kw, split, steps, T, K, ldx, dtype, idx, values, columns, meta, bias, v, m, R, layout)
    plan.provisional = provisional
    return plan


_PLANS: dict[tuple, SpmmPlan | None] = {}


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t if t.is_contiguous() else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _spmm_cuda(x, values, columns, meta, bias, v, m, out_features, config: str | None = None):
    """The CUDA path of the op. ``config`` forces a tile config. Plans are memoized on everything they
    depend on (shapes, dtype, device, the tensors' addresses, the forced config)."""
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
    values, columns, meta = _aligned(values), _aligned(columns), _aligned(meta)
    if bias is not None:
        bias = _aligned(bias.to(x.dtype))
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    config = config or os.environ.get("VENOM_HF_SPMM_CONFIG") or None
    key = (T, K, ldx, x.dtype, idx, values.data_ptr(), columns.data_ptr(), meta.data_ptr(),
           0 if bias is None else bias.data_ptr(), tuple(values.shape), tuple(columns.shape), v, m, R, config,
           _tunables(), tensor_version(columns), tensor_version(meta))
    plan = _PLANS.get(key, False)
    if plan is False:
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        plan = make_plan(T, K, ldx, x.dtype, idx, values, columns, meta, bias, v, m, R, config)
        if plan is None or not plan.provisional:  # a capture's stand-in is not kept: the next eager call plans
            _PLANS[key] = plan
    if plan is None:
        return spmm_reference(x, values, columns, meta, bias, v, m, out_features)
    with _on_device(idx):
        y = plan.run(x2.data_ptr(), torch.cuda.current_stream(idx).cuda_stream, (T, R))
    return y.view(*lead, R)


# --------------------------------------------------------------------------------------------- input checks
def check_input(x: torch.Tensor, weight: torch.Tensor, in_features: int | None, layer: "str | Callable[[], str]",
                match_dtype: bool = True) -> None:
    """The checks ``nn.Linear`` makes, with messages that name the layer and the numbers; the same on every
    device. ``in_features`` None: only a bare ``spmm`` call, which checks the padded width itself.
    ``match_dtype`` False (autocast): any floating dtype. ``layer`` may be a callable giving the name, called
    only for a message: under torch.compile, every module attribute a trace reads becomes a guard that is
    checked at every call of the compiled graph."""
    def name() -> str:
        return layer() if callable(layer) else layer

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name()}: the input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name()}: the input must have at least one dimension (its features), got a 0-d tensor")
    width = x.shape[-1]
    if in_features is not None:
        if width != in_features:
            raise ValueError(f"{name()}: the input's last dimension is {width}, the layer takes in_features="
                             f"{in_features} (input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name()}: the input has dtype {x.dtype}; a floating-point input is needed (the weight is "
                        f"{weight.dtype})")
    if match_dtype and x.dtype != weight.dtype:
        raise TypeError(f"{name()}: the input has dtype {x.dtype}, the weight {weight.dtype}; cast one of them "
                        f"(x.to({weight.dtype}) or model.to({x.dtype})), as nn.Linear needs")
    if x.device != weight.device:
        raise ValueError(f"{name()}: the input is on {x.device}, the weight on {weight.device}")


def _tunables() -> tuple:
    return (TMA_CTAS_PER_SM, TMA_SMEM_CAP, TMA_MIN_WEIGHTS, STREAM_CTAS_PER_SM, STREAM_SMEM_CAP,
            STREAM_PARTIAL_SHARE, RING_CTAS_PER_SM, RING_SMALL_ROWS, RING_SMALL_ROWS_16, RING_SEL_MAX_K,
            KT_MIN_TOKENS, KT_WIDE_MIN_TOKENS, KT_WIDE_MIN_WEIGHTS, KT128_MIN_CTAS_PER_SM, WG_MIN_TOKENS,
            WG_FIRST_MAX_M, WG_M16_MAX_ROWS, KT32_SMALL_MAX_K, KT32_SMALL_MAX_TOKENS)


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


def spmm(x, values, columns, meta, bias, v: int, m: int, out_features: int, *, in_features: int | None = None
         ) -> torch.Tensor:
    """y = x @ W^T (+ bias) for W (out_features x K, V:2:M) in the canonical packed layout.

    x: (..., K) fp16/bf16 on CUDA for the kernel (float32/float64 and other devices run the reference);
    its dtype and device must be those of ``values`` (as for ``nn.Linear``), and K must be ``in_features``
    when given, else within the padded width of ``values``. Returns (..., out_features) in x.dtype.
    values (Rp, Gp, 2), columns (Rb, Gp, 4) uint8, meta (Rp, Gp) uint8.
    """
    check_input(x, values, in_features, "venom_hf.spmm")
    if in_features is None:
        padded = values.shape[1] * int(m)
        if not padded - 8 * int(m) < x.shape[-1] <= padded:
            raise ValueError(f"venom_hf.spmm: the input's last dimension is {x.shape[-1]}, but the packed weight "
                             f"({values.shape[1]} column groups of {m}) holds {padded - 8 * int(m) + 1} to {padded} "
                             "input features")
    return torch.ops.venom.spmm(x, values, columns, meta, bias, int(v), int(m), int(out_features))
