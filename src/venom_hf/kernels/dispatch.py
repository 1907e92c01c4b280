"""Per-card dispatch tables: which tile config runs a layer shape at a token count, as measured on the card.

``ops.make_plan`` asks :func:`config_for` first and falls back to the hand-written heuristic of
``ops._search_config`` for shapes and token counts a table does not cover, for configs that do not fit the
call, and for cards without a table. Nothing is timed during a user's forward pass: tables are written
by ``venom-hf tune`` (``venom_hf.bench.tune``) and only read here.

A table is JSON (``TABLE_FORMAT`` 1)::

    {"format": 1, "card": "NVIDIA H200", "arch": "sm_90", "num_sms": 132, "dtype": "bfloat16",
     "entries": [{"v": 64, "m": 8, "rows": 4096, "groups": 512, "tokens": 1, "config": "ring_n1r1sel",
                  "us": 9.1, "heuristic": "ring_n1r1", "heuristic_us": 9.8}, ...]}

``rows`` and ``groups`` are the packed weight's padded row count and column-group count (``values.shape[:2]``),
``tokens`` a measured token count. A call with T tokens takes the entry of the smallest measured token
count >= T of its shape (the largest one above the last), and never crosses the decode/prefill boundary
(16 tokens), where the kernels change. Tables are looked up by card name: the package ships
``tables/<card-slug>.json``; ``$VENOM_HF_CACHE/dispatch/<card-slug>.json`` (what ``venom-hf tune`` writes)
adds to it and wins where both have an entry. ``VENOM_HF_DISPATCH=heuristic`` ignores every table.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
from pathlib import Path

from . import configs as _cfg
from .nvrtc import cache_dir

logger = logging.getLogger("venom_hf")

TABLE_FORMAT = 1
DECODE_MAX_TOKENS = 16  # ops._search_config: decode kernels up to here, prefill kernels above
PACKAGE_TABLES = Path(__file__).resolve().parent / "tables"


def card_slug(name: str) -> str:
    """File-name form of a card name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def user_table_path(card: str) -> Path:
    return cache_dir() / "dispatch" / f"{card_slug(card)}.json"


def package_table_path(card: str) -> Path:
    return PACKAGE_TABLES / f"{card_slug(card)}.json"


class DispatchTableError(ValueError):
    pass


def validate_table(table: dict, where: str = "table") -> None:
    """Raise DispatchTableError naming the first problem of a table (format, fields, unknown configs)."""
    if not isinstance(table, dict):
        raise DispatchTableError(f"{where}: not a JSON object")
    if table.get("format") != TABLE_FORMAT:
        raise DispatchTableError(f"{where}: format {table.get('format')!r}, this venom_hf reads format {TABLE_FORMAT}")
    for key in ("card", "num_sms", "entries"):
        if key not in table:
            raise DispatchTableError(f"{where}: missing {key!r}")
    for i, e in enumerate(table["entries"]):
        for key in ("v", "m", "rows", "groups", "tokens", "config"):
            if key not in e:
                raise DispatchTableError(f"{where}: entry {i} has no {key!r}")
        if e["config"] not in _cfg.BY_NAME:
            raise DispatchTableError(f"{where}: entry {i} names config {e['config']!r}, which this venom_hf does "
                                     f"not ship (known: {', '.join(_cfg.BY_NAME)})")


class DispatchTable:
    """The entries of one card, indexed by shape: ``lookup(v, m, rows, groups, tokens)`` -> config name."""

    def __init__(self, entries: list[dict], num_sms: int | None = None, sources: tuple[str, ...] = ()):
        self.num_sms = num_sms
        self.sources = sources
        self._by_shape: dict[tuple, tuple[list[int], list[str]]] = {}
        merged: dict[tuple, str] = {}
        for e in entries:  # later entries win (user table after the package's)
            merged[(int(e["v"]), int(e["m"]), int(e["rows"]), int(e["groups"]), int(e["tokens"]))] = e["config"]
        for (v, m, rows, groups, tokens), name in sorted(merged.items()):
            ts, names = self._by_shape.setdefault((v, m, rows, groups), ([], []))
            ts.append(tokens)
            names.append(name)

    def __len__(self) -> int:
        return sum(len(ts) for ts, _ in self._by_shape.values())

    def lookup(self, v: int, m: int, rows: int, groups: int, tokens: int) -> str | None:
        found = self._by_shape.get((v, m, rows, groups))
        if found is None:
            return None
        ts, names = found
        decode = tokens <= DECODE_MAX_TOKENS
        lo = 0 if decode else bisect.bisect_right(ts, DECODE_MAX_TOKENS)
        hi = bisect.bisect_right(ts, DECODE_MAX_TOKENS) if decode else len(ts)
        if lo == hi:
            return None
        i = bisect.bisect_left(ts, tokens, lo, hi)
        return names[min(i, hi - 1)]


def _read(path: Path) -> dict | None:
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("venom_hf: ignoring dispatch table %s: %s", path, e)
        return None
    try:
        validate_table(table, str(path))
    except DispatchTableError as e:
        logger.warning("venom_hf: ignoring dispatch table: %s", e)
        return None
    return table


def load_table(card: str, num_sms: int) -> DispatchTable | None:
    """The package's and the user's table for ``card`` merged (None when neither exists). A table made on a
    card with another SM count (a differently configured part of the same name) is ignored."""
    entries, sources = [], []
    for path in (package_table_path(card), user_table_path(card)):
        table = _read(path)
        if table is None:
            continue
        if int(table["num_sms"]) != num_sms:
            logger.warning("venom_hf: ignoring dispatch table %s: made on %s SMs, this card has %s", path,
                           table["num_sms"], num_sms)
            continue
        entries += table["entries"]
        sources.append(str(path))
    return DispatchTable(entries, num_sms, tuple(sources)) if sources else None


_TABLES: dict[tuple[str, int], DispatchTable | None] = {}


def table_for(card: str, num_sms: int) -> DispatchTable | None:
    key = (card, num_sms)
    if key not in _TABLES:
        _TABLES[key] = load_table(card, num_sms)
    return _TABLES[key]


def reload() -> None:
    """Forget the loaded tables (after ``venom-hf tune`` wrote one in this process)."""
    _TABLES.clear()


def config_for(card: str, num_sms: int, v: int, m: int, rows: int, groups: int, tokens: int) -> str | None:
    """The measured config name for this call, or None (no table, shape not tuned, or tables switched off)."""
    if os.environ.get("VENOM_HF_DISPATCH", "").lower() == "heuristic":
        return None
    table = table_for(card, num_sms)
    return None if table is None else table.lookup(v, m, rows, groups, tokens)
