"""The named data sources of the CLI: ``bbc`` (BBC News articles), ``austen`` (Jane Austen's novels) or a text file."""

from __future__ import annotations

import os

from ..evaluation import text_batches, token_windows

__all__ = ["CALIB_SOURCES", "read_text_file", "calibration_batches", "is_calib_source"]

CALIB_SOURCES = ("bbc", "austen")


def is_calib_source(value: str) -> bool:
    """``bbc``, ``austen``, a ``.txt`` path or an existing file."""
    return value in CALIB_SOURCES or value.endswith(".txt") or os.path.isfile(value)


def read_text_file(path: str) -> str:
    """The text of ``path``; ``FileNotFoundError`` / ``ValueError`` when it is missing or empty."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file {path!r} is empty")
    return text


def calibration_batches(tokenizer, source: str, samples: int, seq_len: int, batch_size: int, seed: int = 0):
    """Calibration batches: ``samples`` BBC News training articles (truncated to ``seq_len`` tokens), or
    ``samples`` contiguous ``seq_len``-token windows of Jane Austen's *Emma* / of a text file."""
    from . import assets

    if source == "bbc":
        texts = assets.bbc_news()["train"].shuffle(seed=seed)["text"][:samples]
        return text_batches(tokenizer, texts, seq_len, batch_size)
    text = assets.jane_austen()["emma"] if source == "austen" else read_text_file(source)
    try:
        return token_windows(tokenizer, text, samples, seq_len, batch_size)
    except ValueError as e:
        raise ValueError(f"calibration text: {e} (--seq-len {seq_len})") from None
