"""Console helpers of the ``venom-hf`` commands and the demo: user-facing errors, device choice, tables, sizes.

A top layer (like ``venom_hf.cli``): nothing in format / kernels / modules / hf / pruning imports it.
"""

from __future__ import annotations

import os

__all__ = ["CLIError", "pick_device", "device_line", "table", "mb", "dir_bytes"]


class CLIError(Exception):
    """A user-facing error: the CLI prints it as one line and exits with code 2."""


def pick_device(choice: str):
    """``"auto"`` (CUDA when torch sees a GPU, else CPU), ``"cpu"`` or ``"cuda"`` (``CLIError`` without a GPU)."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(choice)


def device_line(device) -> str:
    """One line saying which path packed layers take on ``device``."""
    import torch

    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)} (CUDA): packed layers run the Spatha kernel (venom::spmm)"
    return ("device: CPU -- no CUDA GPU, falling back to CPU. Packed layers run the *reference* path "
            "(unpack + dense matmul): it checks correctness and is not a fast kernel; speed-ups need an NVIDIA GPU")


def table(rows: list[list], header: list[str], align: str | None = None) -> str:
    """A compact fixed-width table (``align``: one char per column, 'l' or 'r')."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def fmt(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def dir_bytes(path: str) -> int:
    """Bytes of the ``*.safetensors`` files of a checkpoint folder."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
