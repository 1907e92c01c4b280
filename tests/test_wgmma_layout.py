"""CPU: the sm_90a kernel's chunk layout (format.wgmma_layout) read back the way the kernel's threads read it
reproduces the packed weight exactly, as a valid 2:4 weight (ordered metadata, at most 2 values per chunk);
and so does the consumers' bit-level A build (swizzled shared-memory addresses, PRMT selectors), emulated."""

from __future__ import annotations

import pytest
import torch

from venom_hf import format as vf


def decode_like_the_kernel(values: torch.Tensor, layout: torch.Tensor, m: int, shape: tuple[int, int]) -> torch.Tensor:
    """Dense weight from the canonical values + the chunk layout, lane by lane as spatha_spmm_wg builds its
    wgmma A registers (a0..a3 = chunks tig / tig+4 of rows g / g+8) and metadata (lanes tig 0, 1)."""
    rp, gp, _ = values.shape
    tiles, nks, _ = layout.shape
    words = layout[..., :256].reshape(tiles, nks, 64, 4).long()
    words = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
    halves = layout[..., 256:].reshape(tiles, nks, 128, 2).long()
    halves = halves[..., 0] | halves[..., 1] << 8
    dense = torch.zeros(tiles * 64, nks * 32, dtype=torch.float64)
    vals = torch.zeros(tiles * 64, gp, 2, dtype=torch.float64)
    vals[:rp] = values.double()
    for t in range(tiles):
        for k in range(nks):
            for w in range(4):
                for g in range(8):
                    for tig in range(4):
                        code = int(halves[t, k, w * 32 + g * 4 + tig])
                        for reg, (half, hi) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
                            row = 64 * t + 16 * w + g + 8 * half
                            chunk = 8 * k + tig + 4 * hi
                            # the metadata register of lane (g, tig & 1 == hi) holds chunks 4hi..4hi+3
                            e = int(words[t, k, w * 16 + g * 2 + hi])
                            nib = (e >> (16 * half + 4 * (chunk % 4))) & 15
                            idx0, idx1 = nib & 3, nib >> 2
                            assert idx0 < idx1, (t, k, w, g, tig, reg)
                            c = (code >> (4 * [0, 2, 1, 3][reg])) & 15
                            grp = 4 * chunk // m
                            for idx, s in ((idx0, c & 3), (idx1, c >> 2)):
                                assert s in (0, 1, 2)
                                if s < 2 and grp < gp:
                                    dense[row, 4 * chunk + idx] += vals[row, grp, s]
    return dense[: shape[0], : shape[1]]


@pytest.mark.parametrize("R,K,spec", [(64, 64, "64:2:8"), (200, 264, "32:2:4"), (136, 520, "128:2:32"),
                                      (256, 300, "16:2:16"), (96, 200, "32:2:8"),
                                      (2304, 40, "64:2:8")])
def test_wgmma_layout_reproduces_the_weight(R, K, spec):
    torch.manual_seed(R + K)
    w = torch.randn(R, K)
    p = vf.pack(w, spec)
    s = vf.VNMSpec.parse(spec)
    lay = vf.wgmma_layout(p.columns, p.meta, s, R)
    rows = -(-R // 256) * 256
    steps = -(-(-(-p.values.shape[1] * s.m // 32)) // 4) * 4
    assert lay.shape == (rows // 64, steps, 512) and lay.dtype == torch.uint8
    got = decode_like_the_kernel(p.values, lay, s.m, (R, K))
    assert torch.equal(got, vf.unpack(p).double())


def test_wgmma_layout_rejects_m_not_multiple_of_4():
    p = vf.pack(torch.randn(64, 60), "64:2:6")
    with pytest.raises(vf.VNMFormatError, match="M % 4"):
        vf.wgmma_layout(p.columns, p.meta, "64:2:6", 64)


# ---- the v8.1 consumer's bit-level A build (csrc/spatha.cuh, wg_main), emulated -------------------------
def prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result = byte (nibble i of sel) of the 8 bytes b:a."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 15
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:  # sign replicate (the kernel's selectors never ask for it)
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def spread_codes(code: int) -> int:
    y = (code | (code << 8)) & 0x00FF00FF
    y = (y | (y << 4)) & 0x0F0F0F0F
    return ((y & 0x03030303) | ((y & 0x0C0C0C0C) << 2)) & 0xFFFFFFFF


def decode_bitwise_like_the_kernel(values: torch.Tensor, layout: torch.Tensor, m: int, shape) -> torch.Tensor:
    """Dense weight from the bits the v8.1 consumers see: the values of each 128-column stage placed in a
    TMA-swizzled shared-memory image (16-byte chunk index ^ (offset >> 7) & (row bytes / 16 - 1)), read at
    the kernel's per-lane addresses (row0 + 8 at 8 * row-bytes further), permuted by its PRMT selectors."""
    log2m = m.bit_length() - 1
    vrow = 512 >> log2m  # bytes per row and stage
    vmask = vrow // 16 - 1
    rp, gp, _ = values.shape
    tiles, nks, _ = layout.shape
    bits = values.contiguous().view(torch.int16).long() & 0xFFFF
    words_all = torch.zeros(tiles * 64, gp, dtype=torch.long)
    words_all[:rp] = bits[..., 0] | (bits[..., 1] << 16)
    meta = layout[..., :256].reshape(tiles, nks, 64, 4).long()
    meta = meta[..., 0] | meta[..., 1] << 8 | meta[..., 2] << 16 | meta[..., 3] << 24
    codes = layout[..., 256:].reshape(tiles, nks, 128, 2).long()
    codes = codes[..., 0] | codes[..., 1] << 8
    dense = torch.zeros(tiles * 64, nks * 32, dtype=torch.float64)
    per_stage = 128 // m  # value words per row and stage
    for cta in range(tiles // 4):
        for st in range(nks // 4):
            smem = {}
            for rr in range(256):
                for j in range(per_stage):
                    grp = st * per_stage + j
                    off = rr * vrow + 4 * j
                    smem[off ^ (((off >> 7) & vmask) << 4)] = int(words_all[cta * 256 + rr, grp]) if grp < gp else 0
            for wg in range(4):
                t = cta * 4 + wg
                for wl in range(4):
                    for lane in range(32):
                        g, tig = lane >> 2, lane & 3
                        row0 = wg * 64 + wl * 16 + g
                        for k in range(4):
                            ks = 4 * st + k
                            vaddr = []
                            for j in range(2):
                                off = row0 * vrow + ((((8 * k + tig + 4 * j) * 4) >> log2m) * 4)
                                vaddr.append(off ^ (((off >> 7) & vmask) << 4))
                            w = spread_codes(int(codes[t, ks, wl * 32 + lane]))
                            sel0, sel1 = prmt(0x00543210, 0, w), prmt(0x00543210, 0, w >> 16)
                            regs = [prmt(smem[vaddr[0]], 0, sel0), prmt(smem[vaddr[0] + 8 * vrow], 0, sel1),
                                    prmt(smem[vaddr[1]], 0, sel0 >> 16), prmt(smem[vaddr[1] + 8 * vrow], 0, sel1 >> 16)]
                            for reg, (half, hi) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
                                row = 64 * t + 16 * wl + g + 8 * half
                                chunk = 8 * ks + tig + 4 * hi
                                e = int(meta[t, ks, wl * 16 + g * 2 + hi])
                                nib = (e >> (16 * half + 4 * (chunk % 4))) & 15
                                for slot, idx in enumerate((nib & 3, nib >> 2)):
                                    h = (regs[reg] >> (16 * slot)) & 0xFFFF
                                    val = torch.tensor([h - 65536 if h >= 32768 else h], dtype=torch.int16)
                                    dense[row, 4 * chunk + idx] += float(val.view(values.dtype))
    return dense[: shape[0], : shape[1]]


@pytest.mark.parametrize("R,K,spec", [(256, 256, "64:2:8"), (200, 264, "32:2:4"), (136, 520, "64:2:16"),
                                      (256, 300, "16:2:32")])
def test_v81_bitwise_a_build_reproduces_the_weight(R, K, spec):
    """Every M the kernel runs (4, 8, 16, 32): swizzled value words, the 8 * row-bytes step to row0 + 8, the
    spread source codes and the two-level PRMT give exactly the packed weight."""
    torch.manual_seed(R * K)
    w = torch.randn(R, K).half()
    p = vf.pack(w, spec)
    s = vf.VNMSpec.parse(spec)
    lay = vf.wgmma_layout(p.columns, p.meta, s, R)
    got = decode_bitwise_like_the_kernel(p.values, lay, s.m, (R, K))
    assert torch.equal(got, vf.unpack(p).double())
