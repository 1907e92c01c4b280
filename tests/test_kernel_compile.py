"""CI (no GPU): NVRTC compiles every shipped Spatha template instance for sm_80, sm_90 and sm_90a, and the
custom op's CPU path / fake implementation behave. Skipped when cuda-python / NVRTC is missing."""

from __future__ import annotations

import pytest
import torch

from venom_hf import format as vf
from venom_hf.kernels import configs, nvrtc, ops, spmm


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_nvrtc_compiles_every_instance(arch, tmp_path, monkeypatch):
    if not nvrtc.nvrtc_available():
        pytest.skip("cuda-python / NVRTC not importable")
    monkeypatch.setenv("VENOM_HF_CACHE", str(tmp_path))
    exprs = configs.all_name_expressions()
    cubin, lowered = nvrtc.cached_cubin(exprs, arch)
    assert cubin[:4] == b"\x7fELF" and set(lowered) == set(exprs)
    assert all(name.startswith("_Z") for name in lowered.values())
    # second call hits the disk cache
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".cubin") for f in files)
    cubin2, lowered2 = nvrtc.cached_cubin(exprs, arch)
    assert cubin2 == cubin and lowered2 == lowered


def test_compile_error_shows_log():
    if not nvrtc.nvrtc_available():
        pytest.skip("cuda-python / NVRTC not importable")
    with pytest.raises(nvrtc.CompileError, match="undeclared|identifier"):
        nvrtc.compile_cubin("__global__ void k() { undeclared_thing(); }", [], "sm_80")


def _case(R=200, K=300, spec="64:2:8", dtype=torch.float32):
    w = torch.randn(R, K).to(dtype)
    return vf.pack(w, spec)


def test_fake_impl_and_compile():
    p = _case()
    x = torch.randn(5, 300)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = torch.ops.venom.spmm(fx, mode.from_tensor(p.values), mode.from_tensor(p.columns),
                                   mode.from_tensor(p.meta), None, 64, 8, 200)
        assert out.shape == (5, 200)
    f = torch.compile(lambda x: spmm(x, p.values, p.columns, p.meta, None, 64, 8, 200), fullgraph=True)
    torch.testing.assert_close(f(x), vf.vnm_linear(x, p))


def test_choose_config_rules():
    for T in (1, 7, 16, 33, 128, 4096):
        for v in (16, 32, 64, 128):
            for m in (4, 8, 16, 32, 64, 128, 256):
                cfg, kw, split, steps = ops.choose_config(T, 4096, 512, v, m, 132, 227 * 1024)
                if cfg is None:  # the x span of one k-step does not fit shared memory: reference path
                    assert m > 128
                    continue
                if cfg.kernel == "kt":  # v3 prefill kernel: the CTA's rows lie in one V-block
                    assert T >= ops.KT_MIN_TOKENS and v % cfg.bm == 0 and kw == cfg.kw_fixed
                    assert steps <= configs.KT_MAX_STEPS
                    assert cfg.smem_bytes(m, kw, steps) <= 227 * 1024
                elif cfg.kernel in ("stream", "ring"):  # v4 / v5 decode kernels: whole pairs of k-steps per split
                    assert T <= 16 and T <= cfg.bn and v % cfg.wm == 0 and kw == 2 and steps % 2 == 0
                    assert cfg.smem_bytes(m, kw, steps, T) <= ops.STREAM_SMEM_CAP
                else:
                    assert v % cfg.wm == 0
                    assert cfg.smem_bytes(m, kw) <= 227 * 1024
                assert steps % kw == 0 and split * steps >= 512 // 8 > (split - 1) * steps
    # long K: the kt kernel stages at most KT_MAX_STEPS k-steps of column indices per CTA (split-K)
    cfg, kw, split, steps = ops.choose_config(4096, 4096, 8 * 1500, 64, 4, 132, 227 * 1024)
    assert cfg.kernel == "kt" and steps <= configs.KT_MAX_STEPS and split * steps >= 1500


def test_prefill_dispatch_v128():
    """V % 128 == 0: the 128-row kt tiles only from 2048 tokens and with enough CTAs (the H100 cold-weight v5.2 table), else the
    64-row tiles."""
    pick = lambda T, R, K: ops.choose_config(T, R, K // 8, 128, 8, 132, 227 * 1024)[0].name  # noqa: E731
    assert pick(2048, 4096, 4096) == "kt128x128" and pick(8192, 11008, 4096) == "kt128x128"
    assert pick(512, 4096, 4096) == "kt64x128k2" and pick(128, 11008, 4096) == "kt64x128k2"
    assert pick(2048, 768, 768) == "kt64x128k2" and pick(8192, 192, 576) == "kt64x128k2"
    assert pick(8192, 768, 768) == "kt128x128"  # 6 x 64 tiles


def test_decode_dispatch():
    """Decode (<= 16 tokens): the v5 ring kernel or the v4 stream kernel, as the H100 v5/v5.1 sweeps measured;
    every choice fits its V and token count."""
    expect = {  # (T, R, m) -> config for V >= 32
        (1, 4096, 8): "ring_n1r1sel", (1, 768, 8): "ring_n1r1k8", (1, 11008, 16): "ring_n1r1sel",
        (2, 4096, 8): "ring_n1r1", (2, 11008, 16): "stream_n1r2",
        (8, 4096, 8): "stream_n1r2", (3, 11008, 16): "stream_n1r2", (8, 22016, 8): "stream_n1r2",
        (8, 768, 8): "ring_n1r1k8", (16, 4096, 8): "ring_n2r2w8",
        (16, 11008, 16): "ring_n2r2w8", (16, 4096, 16): "stream_n2r1", (16, 768, 8): "ring_n2r1",
        (16, 3072, 8): "ring_n2r1",
    }
    for T in (1, 2, 3, 8, 9, 16):
        for v in (16, 32, 64, 128):
            for R, m in ((4096, 8), (4096, 16), (768, 8), (3072, 8), (11008, 16), (22016, 8)):
                cfg = ops.choose_config(T, R, 4096 // m, v, m, 132, 227 * 1024)[0]
                assert cfg.kernel in ("ring", "stream") and T <= cfg.bn and v % cfg.wm == 0
                if v >= 32 and (T, R, m) in expect:
                    assert cfg.name == expect[(T, R, m)], (T, R, v, m, cfg.name)
    # 1 token, K > RING_SEL_MAX_K (Llama down_proj): the pre-gathered x of ring_n1r1sel grows with K
    assert ops.choose_config(1, 4096, 11008 // 8, 64, 8, 132, 227 * 1024)[0].name == "ring_n1r1"
    assert ops.choose_config(1, 11008, 11008 // 16, 64, 16, 132, 227 * 1024)[0].name == "stream_n1r2"


def test_tma_dispatch_rules():
    """v7 TMA decode kernel: only where the device has TMA, whole ring stages per split, within its shared
    memory cap, never with metadata rows that are not 16-byte aligned; first in the heuristic only for <= 8
    tokens on big layers."""
    assert [ops.has_tma(a) for a in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_120")] == [
        False, False, False, True, True, True, True]
    tma_names = [c.name for c in configs.CONFIGS if c.kernel == "tma"]
    for T in (1, 2, 5, 8, 9, 16):
        for R, K, v, m in ((28672, 4096, 64, 8), (4096, 14336, 64, 8), (4096, 4096, 64, 16), (1000, 4096, 32, 16),
                           (2048, 640, 64, 8), (4096, 1000, 128, 4), (576, 576, 64, 8)):
            p = vf.packed_shapes(R, K, f"{v}:2:{m}")["values"]
            Rp, Gp = p[0], p[1]
            auto_off = ops.choose_config(T, Rp, Gp, v, m, 132, 227 * 1024)[0]
            assert auto_off.kernel != "tma"
            auto_on = ops.choose_config(T, Rp, Gp, v, m, 132, 227 * 1024, tma=True)[0]
            big = T <= 8 and Rp * Gp * m >= ops.TMA_MIN_WEIGHTS and Gp % 16 == 0
            assert (auto_on.kernel == "tma") == big, (T, R, K, auto_on.name)
            for name in tma_names:
                c = configs.BY_NAME[name]
                assert ops.choose_config(T, Rp, Gp, v, m, 132, 227 * 1024, name)[0].name != name  # no TMA
                got, kw, split, steps = ops.choose_config(T, Rp, Gp, v, m, 132, 227 * 1024, name, tma=True)
                if got.name != name:  # the documented fallbacks
                    assert Gp % 16 or T > c.bn or v % c.wm or \
                        c.smem_bytes(m, 2, 2 * c.pairs_per_stage, T) > ops.TMA_SMEM_CAP
                    continue
                nsteps = Gp // 8
                assert kw == 2 and steps % (2 * c.pairs_per_stage) == 0
                assert split * steps >= nsteps > (split - 1) * steps
                assert c.smem_bytes(m, 2, steps, T) <= ops.TMA_SMEM_CAP and c.threads == 32 * (c.warps_m + 1)
                assert 16 * c.rt * c.warps_m <= 256  # the TMA box height



def test_wg_dispatch_rules():
    """v8 sparse-wgmma prefill kernel: only on sm_90 (the sm_90a build), for M a power of two in 4..32, first in
    the heuristic from WG_MIN_TOKENS for M <= WG_FIRST_MAX_M (M = 16 below WG_M16_MAX_ROWS rows) except on
    layers narrower than KT32_SMALL_MAX_K up to KT32_SMALL_MAX_TOKENS tokens (kt32x128 first there); whole
    128-column stages per split, split-K only when the 256-row tiles leave SMs idle; its stages fit the shared
    memory."""
    assert [ops.has_wgmma(a) for a in ("sm_80", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_120")] == [
        False, False, True, True, False, False]
    wg_names = [c.name for c in configs.CONFIGS if c.kernel == "wg"]
    for R, K, v, m in ((4096, 4096, 64, 8), (14336, 4096, 128, 16), (768, 3072, 64, 16), (768, 768, 64, 4),
                       (576, 1536, 32, 32), (4096, 4096, 64, 64), (1000, 1000, 16, 8)):
        Rp, Gp = vf.packed_shapes(R, K, f"{v}:2:{m}")["values"][:2]
        for T in (1, 16, 100, 128, 511, 512, 4096):
            assert ops.choose_config(T, Rp, Gp, v, m, 132, 227 * 1024)[0].kernel != "wg"
            auto = ops.choose_config(T, Rp, Gp, v, m, 132, 227 * 1024, wg=True)[0]
            narrow = ops.KT_MIN_TOKENS <= T <= ops.KT32_SMALL_MAX_TOKENS and Gp * m < ops.KT32_SMALL_MAX_K
            first = T >= ops.WG_MIN_TOKENS and m in ops.WG_MS and not narrow and (
                m <= ops.WG_FIRST_MAX_M or (m == 16 and Rp < ops.WG_M16_MAX_ROWS))
            assert (auto.kernel == "wg") == first, (R, K, m, T, auto.name)
            if narrow and v % 32 == 0:
                assert auto.name == "kt32x128", (R, K, m, T, auto.name)
            for name in wg_names:
                c = configs.BY_NAME[name]
                got, kw, split, steps = ops.choose_config(T, Rp, Gp, v, m, 132, 227 * 1024, name, wg=True)
                if got.name != name:
                    assert m not in ops.WG_MS or c.smem_bytes(m, 1) > 227 * 1024
                    continue
                nst = ops.wg_stages(Gp, m)
                assert split * steps >= nst > (split - 1) * steps
                ctas = -(-Rp // 256) * -(-T // c.bn)
                assert split == 1 or ctas * split <= 132
                assert c.threads == 640 and c.bm == 256

def test_tma_params_layout():
    """The ctypes mirror of csrc's TmaParams: two 128-byte tensor maps, then SpmmParams, padded to 64 bytes
    (the kernel's struct alignment; the driver copies sizeof(TmaParams) bytes)."""
    import ctypes

    assert ops._TmaParams.values_map.offset == 0 and ops._TmaParams.meta_map.offset == 128
    assert ops._TmaParams.p.offset == 256
    size = ctypes.sizeof(ops._TmaParams)
    assert size % 64 == 0 and size == 256 + -(-ctypes.sizeof(ops._SpmmParams) // 64) * 64
    t = ops._TmaParams()
    view = t.p
    view.T, view.nsplit = 7, 3  # the plan writes per-call fields through this view
    assert (t.p.T, t.p.nsplit) == (7, 3)


def test_wgmma_switch_off(monkeypatch):
    """VENOM_HF_WGMMA=0 turns the v8 kernel (and its layout memory) off whatever the device."""
    monkeypatch.setattr(ops, "_device_info", lambda idx: ("sm_90", 132, 227 * 1024))
    monkeypatch.setattr(ops._nvrtc, "tensor_maps_available", lambda: True)
    assert ops.device_has_wgmma(0)
    for off in ("0", "off", "false"):
        monkeypatch.setenv("VENOM_HF_WGMMA", off)
        assert not ops.device_has_wgmma(0)
    monkeypatch.setattr(ops, "_device_info", lambda idx: ("sm_89", 128, 99 * 1024))
    monkeypatch.setenv("VENOM_HF_WGMMA", "1")
    assert not ops.device_has_wgmma(0)


def test_wg_params_layout():
    """The ctypes mirror of csrc's WgParams: the x and values tensor maps, the pointers, then the ints, 384
    bytes (the kernel's static_assert)."""
    import ctypes

    w = ops._WgParams
    assert (w.x_map.offset, w.values_map.offset, w.layout.offset, w.ldy.offset, w.T.offset) == (0, 128, 256, 288, 296)
    assert w.log2m.offset == 320 and ctypes.sizeof(w) == 384


def test_tensor_map_encoding_needs_libcuda():
    """Without a driver the TMA kernel is never dispatched, and encoding says why instead of crashing."""
    import ctypes

    if nvrtc.tensor_maps_available():
        pytest.skip("libcuda present")
    with pytest.raises(RuntimeError, match="cuTensorMapEncodeTiled"):
        nvrtc.encode_tensor_map_2d((ctypes.c_uint64 * 16)(), nvrtc.TMAP_UINT16, 0, (64, 64), 128, (32, 64))


def test_choose_config_memo_matches_search_and_sees_tunables(monkeypatch):
    cases = [(T, R, v, m) for T in (1, 9, 16, 100, 2048) for R in (576, 4096, 11008) for v in (64, 128)
             for m in (8, 16)]
    for T, R, v, m in cases:
        args = (T, R, 512, v, m, 132, 227 * 1024)
        assert ops.choose_config(*args) == ops._search_config(*args, None) == ops.choose_config(*args)
    args = (100, 4096, 512, 64, 8, 132, 227 * 1024)
    assert ops.choose_config(*args)[0].kernel == "kt"
    monkeypatch.setattr(ops, "KT_MIN_TOKENS", 200)  # a tunable changed after the answer was memoized
    assert ops.choose_config(*args)[0].kernel == "v2" and ops.choose_config(*args) == ops._search_config(*args, None)
    args = (1, 576, 512, 64, 8, 132, 227 * 1024)
    before = ops.choose_config(*args)
    assert before[0].kernel == "ring"
    monkeypatch.setattr(ops, "RING_CTAS_PER_SM", 0.25)  # what the sweep and the GPU tests change
    after = ops.choose_config(*args)
    assert after == ops._search_config(*args, None) and after[2] < before[2]  # fewer splits
    monkeypatch.setenv("VENOM_HF_SPMM_CONFIG", "decode16")
    assert ops.choose_config(*args)[0].name == "decode16"


def test_is_available_false_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    from venom_hf.kernels import is_available

    assert not is_available()
