"""Kernels to profile with Nsight Compute (one launch each after warm-up):

    ncu --clock-control none -k regex:spatha_spmm_kt --launch-skip 3 --launch-count 1 --section ... \\
        python scripts/ncu_profile.py kt

kt: the v3 prefill kernel on Llama-7B qkvo (4096x4096, 2048 tokens, 64:2:8, fp16, kt64x128k2);
stream: the v4 decode kernel on Llama-7B up (11008x4096, 16 tokens, 64:2:8, fp16);
ring: the v5 decode kernel on a fused q|k|v (12288x4096, 1 token, 64:2:8, fp16, ring_n1r1).
An optional second argument names another tile config of the same kernel (e.g. kt64x256, ring_n1r1sel).
"""
import sys

import torch

from venom_hf import format as vf
from venom_hf.kernels import ops

which = sys.argv[1] if len(sys.argv) > 1 else "kt"
dev = torch.device("cuda")
R, K, T, cfg = {"kt": (4096, 4096, 2048, "kt64x128k2"), "stream": (11008, 4096, 16, "stream_n2r2"),
                "ring": (12288, 4096, 1, "ring_n1r1")}[which]
if len(sys.argv) > 2:
    cfg = sys.argv[2]
w = torch.randn(R, K, device=dev).half()
p = vf.pack(w, "64:2:8")
x = torch.randn(T, K, device=dev).half()
for _ in range(5):
    y = ops._spmm_cuda(x, p.values, p.columns, p.meta, None, 64, 8, R, config=cfg)
torch.cuda.synchronize()
print(which, "done", tuple(y.shape))
