"""CPU: the sm_90a kernel's chunk layout (format.wgmma_layout) read back the way the kernel's threads read it
reproduces the packed weight exactly, as a valid 2:4 weight (ordered metadata, at most 2 values per chunk)."""

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
