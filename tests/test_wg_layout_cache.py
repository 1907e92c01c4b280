"""CPU: the lifecycle of the per-weight derived layouts (the v8 kernel's chunk layout, ops.wg_layout, and the
v7 kernel's register-order metadata, ops.meta_layout) with the driver calls replaced by a ledger: built once per weight, rebuilt after an in-place update of columns/meta (the stale one
freed), freed with its weight, never built or freed inside a capture (the free waits for the next build)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from venom_hf import format as vf
from venom_hf.kernels import ops


class _Stream:
    cuda_stream = 0

    def synchronize(self):
        pass


@pytest.fixture
def ledger(monkeypatch):
    book = {"alloc": [], "free": [], "capturing": False, "next": 0x1000}

    def alloc(n, idx):
        book["next"] += 0x1000
        book["alloc"].append(book["next"])
        return book["next"]

    monkeypatch.setattr(ops._nvrtc, "alloc_bytes", alloc)
    monkeypatch.setattr(ops._nvrtc, "copy_async", lambda dst, src, n, stream: None)
    monkeypatch.setattr(ops._nvrtc, "free", lambda ptr: book["free"].append(ptr))
    monkeypatch.setattr(ops, "_on_device", lambda idx: contextlib.nullcontext())
    monkeypatch.setattr(ops.torch.cuda, "is_current_stream_capturing", lambda: book["capturing"])
    monkeypatch.setattr(ops.torch.cuda, "current_stream", lambda idx=None: _Stream())
    monkeypatch.setattr(ops, "_LAYOUTS", {})
    monkeypatch.setattr(ops, "_PENDING_FREES", [])
    return book


def _packed(seed):
    torch.manual_seed(seed)
    return vf.pack(torch.randn(256, 128), "64:2:8")


def test_built_once_then_rebuilt_after_an_in_place_update(ledger):
    p, q = _packed(0), _packed(1)
    a = ops.wg_layout(p.values, p.columns, p.meta, 64, 8, 0)
    assert ops.wg_layout(p.values, p.columns, p.meta, 64, 8, 0) == a and ledger["alloc"] == [a]
    p.columns.copy_(q.columns)  # e.g. load_state_dict into the packed layer
    p.meta.copy_(q.meta)
    b = ops.wg_layout(p.values, p.columns, p.meta, 64, 8, 0)
    assert b != a and ledger["free"] == [a] and len(ops._LAYOUTS) == 1


def test_freed_with_its_weight_and_never_inside_a_capture(ledger):
    p = _packed(2)
    a = ops.wg_layout(p.values, p.columns, p.meta, 64, 8, 0)
    ledger["capturing"] = True
    r = _packed(3)
    assert ops.wg_layout(r.values, r.columns, r.meta, 64, 8, 0) is None  # no allocation during capture
    del p
    gc.collect()
    assert ledger["free"] == [] and ops._PENDING_FREES == [a] and not ops._LAYOUTS  # deferred, dropped
    ledger["capturing"] = False
    b = ops.wg_layout(r.values, r.columns, r.meta, 64, 8, 0)
    assert ledger["free"] == [a] and ledger["alloc"] == [a, b] and not ops._PENDING_FREES


def test_a_freed_layout_drops_the_plans_that_hold_it(ledger, monkeypatch):
    p = _packed(4)
    a = ops.wg_layout(p.values, p.columns, p.meta, 64, 8, 0)

    class _Plan:
        layout = a

    monkeypatch.setattr(ops, "_PLANS", {"k": _Plan(), "other": None})
    del p
    gc.collect()
    assert list(ops._PLANS) == ["other"] and ledger["free"] == [a]


def test_layout_bytes_are_counted_per_model(ledger):
    p, q = _packed(5), _packed(6)
    ops.wg_layout(p.values, p.columns, p.meta, 64, 8, 0)
    want = vf.wgmma_layout(p.columns, p.meta, "64:2:8", p.values.shape[0]).numel()
    assert want == 256 * 128 * 2 // 8  # 1/8 of the dense weight's bytes (256 x 128, 16-bit)
    assert ops.layout_bytes([p.values, p.columns, p.meta]) == want
    assert ops.layout_bytes([q.values, q.columns, q.meta]) == 0


def test_meta_layout_is_its_own_entry_of_half_the_metadata_bytes(ledger):
    p = _packed(7)
    a = ops.wg_layout(p.values, p.columns, p.meta, 64, 8, 0)
    b = ops.meta_layout(p.values, p.columns, p.meta, 64, 8, 0)
    assert b != a and ops.meta_layout(p.values, p.columns, p.meta, 64, 8, 0) == b and len(ops._LAYOUTS) == 2
    wg_bytes = vf.wgmma_layout(p.columns, p.meta, "64:2:8", p.values.shape[0]).numel()
    assert ops.layout_bytes([p.values]) == wg_bytes + p.meta.numel() // 2
    del p
    gc.collect()
    assert sorted(ledger["free"]) == sorted([a, b]) and not ops._LAYOUTS
