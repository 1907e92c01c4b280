"""A few small Spatha calls (split-K, residues, padding, every dtype) for compute-sanitizer memcheck."""
import math
import sys

import torch

from venom_hf import format as vf
from venom_hf import kernels
from venom_hf.kernels import configs, ops

dev = torch.device("cuda")
bad = 0
for (R, K, v, m, T, cfg) in [(200, 300, 64, 8, 1, None), (136, 520, 16, 16, 33, None), (576, 576, 128, 32, 130, None),
                             (320, 1000, 32, 4, 3, "large32"), (768, 264, 64, 8, 77, "large64"), (192, 576, 16, 8, 70, "large16"),
                             (1536, 576, 32, 16, 20, "small32"), (576, 1536, 64, 8, 9, "decode64"),
                             (200, 300, 64, 8, 33, "kt64x128"), (256, 1000, 128, 4, 130, "kt128x128"),
                             (136, 520, 32, 16, 300, "kt32x128"), (576, 576, 64, 32, 70, "kt64x128k2"),
                             (768, 264, 64, 8, 257, "kt64x256"), (192, 576, 64, 8, 19, "kt64x64"),
                             (200, 300, 64, 8, 1, "stream_n1r2"), (136, 520, 16, 32, 16, "stream_n2r1"),
                             (4096, 1000, 32, 4, 8, "stream_n1r1"), (1000, 4096, 64, 16, 13, "stream_n2r2"),
                             (200, 300, 64, 8, 1, "ring_n1r1"), (136, 520, 16, 32, 16, "ring_n2r1"),
                             (4096, 1000, 32, 4, 8, "ring_n1r1"), (1000, 4096, 64, 16, 13, "ring_n2r2w8"),
                             (576, 576, 64, 8, 3, "ring_n1r1k8"),
                             (200, 300, 64, 8, 5, "ring_n1r1sel"), (1000, 4096, 32, 16, 8, "ring_n1r1k8sel"),
                             (200, 300, 64, 8, 1, "ring_n1r1selt"), (1000, 4096, 32, 16, 3, "ring_n1r1selt")]:
    for dt in (torch.float16, torch.bfloat16):
        w = torch.randn(R, K, device=dev).to(dt)
        p = vf.pack(w, f"{v}:2:{m}")
        x = torch.randn(T, K, device=dev).to(dt)
        b = torch.randn(R, device=dev).to(dt)
        tiles = ops.stream_tiles(p.values, p.meta) if cfg and configs.BY_NAME[cfg].tiled else None
        y = ops._spmm_cuda(x, p.values, p.columns, p.meta, b, v, m, R, config=cfg, tiles=tiles)
        ref = x.double() @ vf.unpack(p).double().T + b.double()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        ok = err < (4e-3 if dt == torch.float16 else 2e-2)
        bad += not ok
        print(f"{R}x{K} {v}:2:{m} T={T} {dt} cfg={cfg}: err {err:.2e} {'ok' if ok else 'FAIL'}")
torch.cuda.synchronize()
sys.exit(1 if bad else 0)
