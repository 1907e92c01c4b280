"""GPU correctness of the Spatha kernel (torch.ops.venom.spmm) against a float64 reference.

Fresh random inputs per case, the caching allocator's memory poisoned with NaN before each call (so
an unwritten output element shows up), residues in every dimension, every shipped tile config, split-K,
non-contiguous / 3-D inputs, bias, torch.compile and CUDA-graph capture. Skipped without CUDA.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gpu_testutils import skip_module_without_spatha

from venom_hf import format as vf

pytestmark = pytest.mark.gpu

skip_module_without_spatha()

from venom_hf import kernels  # noqa: E402
from venom_hf.kernels import configs, ops  # noqa: E402

DEV = torch.device("cuda")
# largest error of an output element vs float64, relative to the element's size plus its row's RMS (check())
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def random_vnm_mask(R: int, K: int, v: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """A random valid V:2:M mask (R, K): per V x M block 4 random columns, per row 2 of them."""
    rb, g = math.ceil(R / v), math.ceil(K / m)
    inside = (torch.arange(g, device=DEV)[:, None] * m + torch.arange(m, device=DEV)) < K  # (G, M)
    cols = (torch.rand(rb, g, m, generator=gen, device=DEV) + inside).topk(4, -1).indices.sort(-1).values
    cols_in = inside[None].expand(rb, g, m).gather(-1, cols)  # columns < K first (last partial group)
    pick = (torch.rand(rb, v, g, 4, generator=gen, device=DEV) + cols_in[:, None]).topk(2, -1).indices
    absolute = cols[:, None].expand(rb, v, g, 4).gather(-1, pick) + torch.arange(g, device=DEV)[:, None] * m
    mask = torch.zeros(rb * v, g * m, dtype=torch.bool, device=DEV)
    mask.scatter_(1, absolute.reshape(rb * v, -1), True)
    return mask[:R, :K].contiguous()


_PACKED: dict = {}


def packed_weight(R, K, v, m, dtype, seed=0):
    key = (R, K, v, m, dtype, seed)
    if key not in _PACKED:
        gen = torch.Generator(device=DEV).manual_seed(hash(key) % (2**31))
        w = torch.randn(R, K, generator=gen, device=DEV).to(dtype)
        mask = random_vnm_mask(R, K, v, m, gen)
        p = vf.pack(w, f"{v}:2:{m}", mask=mask)
        vf.validate(p)
        _PACKED[key] = (p, vf.unpack(p).double())
        if len(_PACKED) > 12:
            _PACKED.pop(next(iter(_PACKED)))
    return _PACKED[key]


def poison():
    """Fill free allocator memory with NaN so that outputs/workspaces start as NaN."""
    free = torch.cuda.mem_get_info()[0]
    n = min(256 << 20, free // 4) // 2
    t = torch.empty(n, dtype=torch.float16, device=DEV).fill_(float("nan"))
    del t


def check(y, x, wd, bias, dtype, what=""):
    ref = x.double() @ wd.T
    if bias is not None:
        ref = ref + bias.double()
    assert y.dtype == dtype and y.shape == ref.shape, what
    assert torch.isfinite(y).all(), f"{what}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    # Per element, not a norm over the whole output: one wrong row (or element) among 4096 moves a relative
    # Frobenius norm by less than the bf16 tolerance. Scaling by |ref| + the row's RMS keeps near-zero
    # outputs (cancellation) from failing on rounding alone.
    rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
    rel = (y.double() - ref).abs() / (ref.abs() + rms).clamp_min(1e-30)
    err = rel.max().item()
    if err >= TOL[dtype]:
        idx = divmod(int(rel.argmax()), rel.shape[-1]) if rel.dim() > 1 else (0, int(rel.argmax()))
        bad_rows = int((rel.amax(-1) >= TOL[dtype]).sum()) if rel.dim() > 1 else 1
        raise AssertionError(f"{what}: max element error {err:.3e} at (row, col) {idx}; {bad_rows} rows over "
                             f"{TOL[dtype]:g}")
    return err


def run_case(R, K, v, m, dtype, T, bias=True, config=None, seed=0, x=None):
    p, wd = packed_weight(R, K, v, m, dtype)
    gen = torch.Generator(device=DEV).manual_seed(1000 + seed + T)
    if x is None:
        x = torch.randn(T, K, generator=gen, device=DEV).to(dtype)
    b = torch.randn(R, generator=gen, device=DEV).to(dtype) if bias else None
    poison()
    if config is None:
        y = kernels.spmm(x, p.values, p.columns, p.meta, b, v, m, R)
    else:
        y = ops._spmm_cuda(x, p.values, p.columns, p.meta, b, v, m, R, config=config)
    torch.cuda.synchronize()
    return check(y, x, wd, b, dtype, f"R={R} K={K} {v}:2:{m} {dtype} T={tuple(x.shape[:-1])} cfg={config}")


# --- layer shapes x token counts (sampled: each case gets one (V, M, dtype) of a fixed cycle) ---------
SHAPES = [
    (768, 768), (3072, 768), (768, 3072),  # BERT-base
    (4096, 4096), (11008, 4096), (4096, 11008),  # Llama-7B
    (576, 576), (192, 576), (1536, 576), (576, 1536),  # SmolLM2-135M
]
TOKENS = [1, 7, 16, 33, 128, 1000, 4096]
VMD = list(itertools.product([64, 128], [4, 8, 16, 32], [torch.float16, torch.bfloat16]))


def _layer_cases():
    cases = []
    i = 0
    for (R, K), T in itertools.product(SHAPES, TOKENS):
        if T == 4096 and R * K > 4096 * 4096 and (R, K) != (11008, 4096):
            continue  # keep the run short: one big Llama prefill case
        v, m, dt = VMD[i % len(VMD)]
        i += 1
        cases.append(pytest.param(R, K, v, m, dt, T, id=f"{R}x{K}-{v}:2:{m}-{str(dt)[6:]}-T{T}"))
    return cases


@pytest.mark.parametrize("R,K,v,m,dtype,T", _layer_cases())
def test_layer_shapes(R, K, v, m, dtype, T):
    run_case(R, K, v, m, dtype, T, bias=(T % 2 == 1 or R == 576))


# --- every V/M/dtype on small odd shapes (row padding, K % M != 0, K % 8 != 0) --------------------------
@pytest.mark.parametrize("v", [16, 32, 64, 128])
@pytest.mark.parametrize("m", [4, 8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_v_m(v, m, dtype):
    for (R, K), T in [((200, 264), 1), ((200, 300), 33), ((136, 520), 130)]:
        run_case(R, K, v, m, dtype, T, bias=True)


# --- every shipped tile config, forced, with residues and split-K ----------------------------------------
@pytest.mark.parametrize("cfg", [c.name for c in configs.CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_config(cfg, dtype):
    c = configs.BY_NAME[cfg]
    v = 128 if 128 % c.wm == 0 else c.wm
    for R, K, m, T in [(576, 576, 8, 5), (1536, 576, 16, 77), (768, 3072, 8, 200), (320, 1000, 32, 3)]:
        run_case(R, K, v, m, dtype, T, bias=True, config=cfg)


# --- v4 stream / v5 ring / v7 tma kernels (decode): every config, K split off and on, odd shapes, every V / M -
STREAM = [c.name for c in configs.CONFIGS if c.decode]


@pytest.mark.parametrize("cfg", STREAM)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ctas_per_sm", [0.001, 2.0, 8.0])  # split 1 / the default / many splits
def test_stream_kernel(cfg, dtype, ctas_per_sm, monkeypatch):
    monkeypatch.setattr(ops, "STREAM_CTAS_PER_SM", ctas_per_sm)
    monkeypatch.setattr(ops, "RING_CTAS_PER_SM", ctas_per_sm)
    monkeypatch.setattr(ops, "TMA_CTAS_PER_SM", ctas_per_sm)
    monkeypatch.setattr(ops, "STREAM_PARTIAL_SHARE", 100.0 if ctas_per_sm > 2 else ops.STREAM_PARTIAL_SHARE)
    c = configs.BY_NAME[cfg]
    cases = [(4096, 4096, 64, 8), (1536, 576, 64, 16), (200, 264, 32, 4), (136, 520, 128, 32), (4096, 11008, 128, 8),
             (768, 3072, 32, 16), (320, 1000, 64, 8)]
    for R, K, v, m in cases:
        v = v if v % c.wm == 0 else c.wm
        for T in sorted({1, 3, c.bn - 1, c.bn}):
            p, _ = packed_weight(R, K, v, m, dtype)
            Gp = p.values.shape[1]
            chosen, kw, split, steps = ops.choose_config(T, p.values.shape[0], Gp, v, m, 132, 227 * 1024, cfg,
                                                         tma=True)
            if chosen.name != cfg:  # the documented fallbacks
                if c.kernel == "tma":  # metadata rows not 16-byte aligned, or one stage does not fit
                    assert Gp % 16 or c.smem_bytes(m, 2, 2 * c.pairs_per_stage, T) > ops.TMA_SMEM_CAP
                else:  # one pair's x chunk + the ring do not fit
                    assert c.smem_bytes(m, 2, 2, T) > ops.STREAM_SMEM_CAP
                continue
            if c.kernel == "tma":
                assert steps % (2 * c.pairs_per_stage) == 0
            assert steps % 2 == 0
            nsteps = p.values.shape[1] // 8
            if ctas_per_sm < 0.005 and c.smem_bytes(m, 2, nsteps + nsteps % 2, T) <= ops.STREAM_SMEM_CAP:
                assert split == 1
            if ctas_per_sm > 2 and c.kernel == "ring" and nsteps >= 4 * c.warps_n:
                assert split > 1  # the global split of the ring kernel runs too
            run_case(R, K, v, m, dtype, T, bias=(T % 2 == 1), config=cfg)


def _read_words(addr: int, n: int) -> list[int]:
    """n 32-bit words of driver memory (the split-K counters live outside torch's allocator)."""
    import ctypes

    from cuda.bindings import driver

    buf = (ctypes.c_uint32 * n)()
    (err,) = driver.cuMemcpyDtoH(ctypes.addressof(buf), addr, 4 * n)
    assert int(err) == 0, err
    return list(buf)


@pytest.mark.parametrize("kernel", ["stream", "ring", "tma"])
def test_stream_split_deterministic_and_counters_reset(kernel, monkeypatch):
    """The one-launch global split-K (v4 always, v5 on small layers, v7 where rows are few): bitwise the same
    result every call, whoever arrives last, and every arrival counter back at zero."""
    R, K, v, m, dtype = 4096, 4096, 64, 8, torch.float16
    monkeypatch.setattr(ops, "RING_CTAS_PER_SM", 8.0)  # the ring splits only small layers by default
    name = {"stream": "stream_n1r2", "ring": "ring_n1r1", "tma": "tma_n1r1w4"}[kernel]
    if kernel == "tma" and not ops.device_has_tma(torch.cuda.current_device()):
        pytest.skip("the TMA kernel needs sm_90+")
    p, wd = packed_weight(R, K, v, m, dtype)
    x = torch.randn(8, K, device=DEV).to(dtype)
    cfg, kw, split, steps = ops.choose_config(8, 4096, 512, v, m, 132, 227 * 1024, name, tma=True)
    assert cfg.kernel == kernel and split > 1
    ys = [ops._spmm_cuda(x, p.values, p.columns, p.meta, None, v, m, R, config=name) for _ in range(5)]
    torch.cuda.synchronize()
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert ops._COUNTERS and all(not any(_read_words(addr, words)) for addr, words in ops._COUNTERS.values())
    check(ys[0], x, wd, None, dtype, f"{kernel} split")


def test_prefill_uses_kt_kernel():
    for v in (32, 64, 128):
        cfg, kw, split, steps = ops.choose_config(2048, 4096, 512, v, 8, 132, 227 * 1024)
        assert cfg.kernel == "kt" and v % cfg.bm == 0
        assert ops.choose_config(ops.KT_MIN_TOKENS - 1, 4096, 512, v, 8, 132, 227 * 1024)[0].kernel == "v2"


@pytest.mark.parametrize("T", [1, 5, 64, 77, 130])
@pytest.mark.parametrize("K", [8, 264, 300, 1000])
def test_transpose_kmajor(T, K):
    buf = torch.randn(T, ((K + 7) // 8) * 8 + 8, device=DEV).half()
    x = buf[:, :K]  # row stride % 8 == 0, 16-byte aligned
    xt = ops.transpose_kmajor(x)
    torch.cuda.synchronize()
    assert xt.shape == (K, ((T + 7) // 8) * 8)
    assert torch.equal(xt[:, :T], x.t())
    assert (xt[:, T:] == 0).all()


def test_split_k_used_and_exact():
    # a short layer with a long K: too few row CTAs, so the default decode kernel splits K across CTAs
    cfg, kw, split, steps = ops.choose_config(1, 576, 512, 64, 8, 132, 227 * 1024)
    assert split > 1
    run_case(576, 4096, 64, 8, torch.float16, 1)


# --- layouts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_noncontiguous_and_3d(dtype):
    R, K, v, m = 768, 768, 64, 8
    p, wd = packed_weight(R, K, v, m, dtype)
    b = torch.randn(R, device=DEV).to(dtype)
    wide = torch.randn(37, K + 64, device=DEV).to(dtype)
    for x in (
        wide[:, 16 : 16 + K],  # row stride K+64, offset 16 elements
        wide[:, 8 : 8 + K],  # offset 8 elements (16-byte aligned)
        wide[:, 3 : 3 + K],  # misaligned: one padded copy
        torch.randn(4, 9, K, device=DEV).to(dtype),  # 3-D
        torch.randn(K, 21, device=DEV).to(dtype).t(),  # column-major (transposed) input
        torch.randn(2, 3, 5, K, device=DEV).to(dtype)[:, 1],  # 3-D non-contiguous view
    ):
        poison()
        y = kernels.spmm(x, p.values, p.columns, p.meta, b, v, m, R)
        torch.cuda.synchronize()
        assert y.shape == (*x.shape[:-1], R)
        check(y.reshape(-1, R), x.reshape(-1, K), wd, b, dtype, f"layout {tuple(x.shape)} {x.stride()}")


def test_bias_is_applied_per_output_feature():
    R, K, v, m, dtype = 256, 512, 64, 8, torch.float16
    p, wd = packed_weight(R, K, v, m, dtype)
    x = torch.zeros(5, K, device=DEV, dtype=dtype)
    b = torch.randn(R, device=DEV).to(dtype)
    y = kernels.spmm(x, p.values, p.columns, p.meta, b, v, m, R)
    torch.testing.assert_close(y, b.expand(5, R), rtol=0, atol=0)


def test_fallback_fp32_matches_reference():
    R, K, v, m = 128, 256, 64, 8
    p, wd = packed_weight(R, K, v, m, torch.float32)
    x = torch.randn(9, K, device=DEV)
    y = kernels.spmm(x, p.values, p.columns, p.meta, None, v, m, R)
    torch.testing.assert_close(y.double(), x.double() @ wd.T, rtol=1e-4, atol=1e-4)


# --- torch.compile and CUDA graphs ------------------------------------------------------------------------
def test_torch_compile():
    R, K, v, m, dtype = 1536, 576, 64, 8, torch.bfloat16
    p, wd = packed_weight(R, K, v, m, dtype)
    b = torch.randn(R, device=DEV).to(dtype)

    def f(x):
        return torch.relu(kernels.spmm(x, p.values, p.columns, p.meta, b, v, m, R)) * 2

    cf = torch.compile(f, fullgraph=True)
    for T in (3, 64, 300):
        x = torch.randn(2, T, K, device=DEV).to(dtype)
        torch.testing.assert_close(cf(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 16, 512])
def test_cuda_graph_capture(T):
    R, K, v, m, dtype = 4096, 4096, 64, 16, torch.float16
    p, wd = packed_weight(R, K, v, m, dtype)
    b = torch.randn(R, device=DEV).to(dtype)
    xs = torch.randn(T, K, device=DEV).to(dtype)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            kernels.spmm(xs, p.values, p.columns, p.meta, b, v, m, R)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = kernels.spmm(xs, p.values, p.columns, p.meta, b, v, m, R)
    for _ in range(3):
        xs.copy_(torch.randn(T, K, device=DEV).to(dtype))
        ys.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check(ys, xs, wd, b, dtype, f"graph T={T}")


def test_deterministic():
    R, K, v, m, dtype = 4096, 4096, 128, 8, torch.bfloat16
    p, _ = packed_weight(R, K, v, m, dtype)
    for T in (4, 700):
        x = torch.randn(T, K, device=DEV).to(dtype)
        y1 = kernels.spmm(x, p.values, p.columns, p.meta, None, v, m, R)
        y2 = kernels.spmm(x, p.values, p.columns, p.meta, None, v, m, R)
        assert torch.equal(y1, y2)


# --- v8 sparse-wgmma prefill kernel (sm_90a) ---------------------------------------------------------------
WG = [c.name for c in configs.CONFIGS if c.kernel == "wg"]
needs_wg = pytest.mark.skipif(not ops.device_has_wgmma(torch.cuda.current_device()),
                              reason="the v8 kernel needs an sm_90 device (sm_90a build)")
WG_CASES = [  # R, K, V, M, token counts: ragged rows (R % 256, R % 64), K % M != 0, K < one stage
    (4096, 4096, 64, 8, (1, 300, 4099)), (1536, 576, 64, 16, (3, 65, 1000)), (200, 264, 32, 4, (17, 300)),
    (136, 520, 128, 32, (65, 129)), (768, 3072, 128, 8, (1000,)), (320, 1000, 16, 8, (77, 300)),
]


@needs_wg
@pytest.mark.parametrize("cfg", WG)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wg_kernel(cfg, dtype):
    c = configs.BY_NAME[cfg]
    for R, K, v, m, tokens in WG_CASES:
        for T in tokens:
            p, _ = packed_weight(R, K, v, m, dtype)
            chosen, _, split, steps = ops.choose_config(T, p.values.shape[0], p.values.shape[1], v, m, 132,
                                                        227 * 1024, cfg, wg=True)
            if chosen.name != cfg:  # the one documented fallback: the stages do not fit in shared memory
                assert c.smem_bytes(m, 1) > 227 * 1024
                continue
            assert split * steps >= ops.wg_stages(p.values.shape[1], m) > (split - 1) * steps
            run_case(R, K, v, m, dtype, T, bias=(T % 2 == 1), config=cfg)


@needs_wg
def test_wg_split_k_and_deterministic():
    R, K, v, m, dtype = 1024, 4096, 64, 8, torch.bfloat16  # 4 x 2 tiles at 256 tokens: split-K
    p, wd = packed_weight(R, K, v, m, dtype)
    x = torch.randn(256, K, device=DEV).to(dtype)
    cfg, _, split, steps = ops.choose_config(256, 1024, p.values.shape[1], v, m, 132, 227 * 1024, "wg256x128s3",
                                             wg=True)
    assert cfg.kernel == "wg" and split > 1
    ys = [ops._spmm_cuda(x, p.values, p.columns, p.meta, None, v, m, R, config="wg256x128s3") for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    check(ys[0], x, wd, None, dtype, "wg split")


@needs_wg
def test_wg_layout_built_once_matches_format_and_freed():
    R, K, v, m, dtype = 512, 1024, 64, 16, torch.float16
    gen = torch.Generator(device=DEV).manual_seed(7)
    w = torch.randn(R, K, generator=gen, device=DEV).to(dtype)
    p = vf.pack(w, f"{v}:2:{m}", mask=random_vnm_mask(R, K, v, m, gen))
    idx = torch.cuda.current_device()
    a = ops.wg_layout(p.values, p.columns, p.meta, v, m, idx)
    assert ops.wg_layout(p.values, p.columns, p.meta, v, m, idx) == a  # cached
    want = vf.wgmma_layout(p.columns.cpu(), p.meta.cpu(), f"{v}:2:{m}", R)
    got = torch.empty(want.numel(), dtype=torch.uint8, device=DEV)
    from venom_hf.kernels import nvrtc

    torch.cuda.synchronize()
    nvrtc.copy_async(got.data_ptr(), a, want.numel(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want.reshape(-1))  # the device build is the format module's, bit for bit
    n = len(ops._LAYOUTS)
    del p
    import gc

    gc.collect()
    assert len(ops._LAYOUTS) == n - 1 and not ops._PENDING_FREES  # freed with its weight


@needs_wg
def test_wg_cuda_graph_and_capture_fallback():
    R, K, v, m, dtype = 2048, 1024, 64, 8, torch.bfloat16
    T = 512
    for warm in (True, False):  # warm: layout built before capture (wg kernel in the graph); cold: fallback
        p, wd = packed_weight(R, K, v, m, dtype, seed=int(warm))
        xs = torch.randn(T, K, device=DEV).to(dtype)
        if warm:
            kernels.spmm(xs, p.values, p.columns, p.meta, None, v, m, R)
        ops._PLANS.clear()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys = kernels.spmm(xs, p.values, p.columns, p.meta, None, v, m, R)
        xs.copy_(torch.randn(T, K, device=DEV).to(dtype))
        ys.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check(ys, xs, wd, None, dtype, f"wg graph warm={warm}")
        if not warm:  # the capture's stand-in plan is not kept: the next eager call makes and keeps the wg plan
            check(kernels.spmm(xs, p.values, p.columns, p.meta, None, v, m, R), xs, wd, None, dtype, "after")
            assert [plan.kind for plan in ops._PLANS.values() if plan] == ["wg"]


@needs_wg
def test_wg_layout_follows_in_place_weight_updates():
    """load_state_dict copies into the packed tensors in place: the derived layout (and the plans that hold it)
    must follow the new columns/meta, not keep the old ones."""
    R, K, v, m, dtype, T = 1024, 1024, 64, 8, torch.bfloat16, 512
    gen = torch.Generator(device=DEV).manual_seed(11)
    a, b = (vf.pack(torch.randn(R, K, generator=gen, device=DEV).to(dtype), f"{v}:2:{m}",
                    mask=random_vnm_mask(R, K, v, m, gen)) for _ in range(2))
    x = torch.randn(T, K, device=DEV).to(dtype)
    check(kernels.spmm(x, a.values, a.columns, a.meta, None, v, m, R), x, vf.unpack(a).double(), None, dtype, "a")
    for dst, src in ((a.values, b.values), (a.columns, b.columns), (a.meta, b.meta)):
        dst.copy_(src)
    poison()
    check(kernels.spmm(x, a.values, a.columns, a.meta, None, v, m, R), x, vf.unpack(b).double(), None, dtype,
          "after the in-place update")


# --- the v7 kernel's metadata in register order (format.decode_meta_layout), built once per weight -----------
needs_tma = pytest.mark.skipif(not ops.device_has_tma(torch.cuda.current_device()),
                               reason="the v7 kernel needs an sm_90 device (TMA)")


@needs_tma
def test_meta_layout_built_once_matches_format_and_freed():
    R, K, v, m, dtype = 512, 2048, 64, 8, torch.bfloat16
    gen = torch.Generator(device=DEV).manual_seed(5)
    p = vf.pack(torch.randn(R, K, generator=gen, device=DEV).to(dtype), f"{v}:2:{m}",
                mask=random_vnm_mask(R, K, v, m, gen))
    idx = torch.cuda.current_device()
    a = ops.meta_layout(p.values, p.columns, p.meta, v, m, idx)
    assert ops.meta_layout(p.values, p.columns, p.meta, v, m, idx) == a  # cached
    assert ops.wg_layout(p.values, p.columns, p.meta, v, m, idx) != a  # the two kinds are separate entries
    want = vf.decode_meta_layout(p.meta.cpu())
    got = torch.empty(want.numel(), dtype=torch.int32, device=DEV)
    from venom_hf.kernels import nvrtc

    torch.cuda.synchronize()
    nvrtc.copy_async(got.data_ptr(), a, 4 * want.numel(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want.reshape(-1))  # the device build is the format module's, bit for bit
    assert ops.layout_bytes([p.values]) == 4 * want.numel() + vf.wgmma_layout(
        p.columns.cpu(), p.meta.cpu(), f"{v}:2:{m}", R).numel()
    n = len(ops._LAYOUTS)
    del p
    import gc

    gc.collect()
    assert len(ops._LAYOUTS) == n - 2 and not ops._PENDING_FREES  # both freed with their weight


@needs_tma
def test_tma_cuda_graph_and_capture_fallback(monkeypatch):
    """Warm (layout built before capture): the v7 kernel runs in the graph; cold: the capture takes another
    decode kernel, and the next eager call makes and keeps the v7 plan."""
    monkeypatch.setenv("VENOM_HF_SPMM_CONFIG", "tma_n1r2w4")
    R, K, v, m, dtype, T = 4096, 2048, 64, 8, torch.bfloat16, 8
    for warm in (True, False):
        p, wd = packed_weight(R, K, v, m, dtype, seed=10 + int(warm))
        xs = torch.randn(T, K, device=DEV).to(dtype)
        if warm:
            kernels.spmm(xs, p.values, p.columns, p.meta, None, v, m, R)
        ops._PLANS.clear()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys = kernels.spmm(xs, p.values, p.columns, p.meta, None, v, m, R)
        captured = [plan for plan in ops._PLANS.values() if plan]
        assert any(plan.cfg.kernel == "tma" for plan in captured) == warm
        xs.copy_(torch.randn(T, K, device=DEV).to(dtype))
        ys.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check(ys, xs, wd, None, dtype, f"tma graph warm={warm}")
        if not warm:
            check(kernels.spmm(xs, p.values, p.columns, p.meta, None, v, m, R), xs, wd, None, dtype, "after")
            assert [plan.cfg.kernel for plan in ops._PLANS.values() if plan] == ["tma"]


@needs_tma
def test_meta_layout_follows_in_place_weight_updates(monkeypatch):
    monkeypatch.setenv("VENOM_HF_SPMM_CONFIG", "tma_n1r1w4")
    R, K, v, m, dtype, T = 1024, 2048, 64, 8, torch.float16, 3
    gen = torch.Generator(device=DEV).manual_seed(13)
    a, b = (vf.pack(torch.randn(R, K, generator=gen, device=DEV).to(dtype), f"{v}:2:{m}",
                    mask=random_vnm_mask(R, K, v, m, gen)) for _ in range(2))
    x = torch.randn(T, K, device=DEV).to(dtype)
    check(kernels.spmm(x, a.values, a.columns, a.meta, None, v, m, R), x, vf.unpack(a).double(), None, dtype, "a")
    assert any(plan.cfg.kernel == "tma" and plan.layout for plan in ops._PLANS.values() if plan)
    for dst, src in ((a.values, b.values), (a.columns, b.columns), (a.meta, b.meta)):
        dst.copy_(src)
    poison()
    check(kernels.spmm(x, a.values, a.columns, a.meta, None, v, m, R), x, vf.unpack(b).double(), None, dtype,
          "after the in-place update")
