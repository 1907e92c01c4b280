"""CPU: the v7 decode kernel's metadata in register order (format.decode_meta_layout) is, word for word, the
mma.sp sparsity register that the v4/v5 kernels' lanes build from the canonical bytes with shuffles and byte
permutes (csrc/spatha.cuh, stream_pair_mma), and it loses nothing of the canonical metadata."""

from __future__ import annotations

import pytest
import torch

from venom_hf import format as vf


def _byte_perm(a: int, b: int, sel: int) -> int:
    """CUDA's __byte_perm(a, b, sel) for selector nibbles 0..7 (byte k of the result = byte sel_k of b:a)."""
    pool = (a | (b << 32)).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[(sel >> (4 * k)) & 7] for k in range(4)), "little")


def _shuffled_registers(meta: torch.Tensor) -> torch.Tensor:
    """The sparsity register of every lane per 16-row tile and pair, as stream_pair_mma computes it: lane
    (g, tig) loads 8 bytes of row g + 8*(tig >> 1) of the pair, from byte 8*(tig & 1); 4 shuffles within the
    lane's quad and 3 byte permutes."""
    rp, gp = meta.shape
    m = meta.tolist()
    out = torch.zeros(rp // 16, gp // 16, 32, dtype=torch.int64)
    for t in range(rp // 16):
        for u in range(gp // 16):
            loaded = []
            for lane in range(32):
                g, tig = lane >> 2, lane & 3
                row, c = 16 * t + g + 8 * (tig >> 1), 16 * u + 8 * (tig & 1)
                x = int.from_bytes(bytes(m[row][c:c + 4]), "little")
                y = int.from_bytes(bytes(m[row][c + 4:c + 8]), "little")
                loaded.append((x & 0x0F0F0F0F) | ((y & 0x0F0F0F0F) << 4))
            for lane in range(32):
                tig = lane & 3
                s = [loaded[(lane & ~3) | j] for j in range(4)]
                sel = tig | ((tig + 4) << 4)
                out[t, u, lane] = _byte_perm(_byte_perm(s[0], s[1], sel), _byte_perm(s[2], s[3], sel), 0x5410)
    return out


@pytest.mark.parametrize("R,K,spec", [(64, 256, "64:2:8"), (128, 1000, "64:2:16"), (40, 130, "16:2:4"),
                                      (96, 300, "32:2:32")])
def test_decode_meta_layout_is_the_kernel_register(R, K, spec):
    torch.manual_seed(R + K)
    p = vf.pack(torch.randn(R, K), spec)
    meta = torch.nn.functional.pad(p.meta, (0, -p.meta.shape[1] % 16, 0, -p.meta.shape[0] % 16))
    words = vf.decode_meta_layout(meta)
    assert words.dtype == torch.int32 and words.shape == (meta.shape[0] // 16, meta.shape[1] // 16, 32)
    assert words.numel() * 4 == meta.numel() // 2  # half the canonical bytes
    assert torch.equal(words.long() & 0xFFFFFFFF, _shuffled_registers(meta))


def test_decode_meta_layout_keeps_every_nibble():
    """Read back by the formula of its docstring, the layout gives the canonical metadata exactly."""
    torch.manual_seed(0)
    p = vf.pack(torch.randn(256, 2048), "64:2:8")
    words = vf.decode_meta_layout(p.meta)
    b = words.contiguous().view(torch.uint8).view(16, 16, 8, 4, 2, 2)  # (t, u, g, q, h, p)
    lo, hi = b & 0x0F, b >> 4
    back = torch.stack([lo, hi], -1)  # (t, u, g, q, h, p, lo/hi)
    back = back.permute(0, 4, 2, 1, 5, 6, 3).reshape(256, 256)  # rows (t, h, g), groups (u, p, lo/hi, q)
    assert torch.equal(back, p.meta)


def test_decode_meta_layout_rejects_unaligned_shapes():
    with pytest.raises(vf.VNMFormatError, match="16"):
        vf.decode_meta_layout(torch.zeros(16, 8, dtype=torch.uint8))
    with pytest.raises(vf.VNMFormatError, match="uint8"):
        vf.decode_meta_layout(torch.zeros(16, 16, dtype=torch.int32))
