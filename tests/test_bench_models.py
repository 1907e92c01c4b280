"""bench.models: encoder variants re-timed in alternating rounds, median kept."""

import torch

from venom_hf.bench import models


def test_retime_encoders_alternates_order_and_keeps_the_median(monkeypatch):
    calls = []
    fake = {"a": iter([5.0, 1.0]), "b": iter([2.0, 9.0])}  # each variant's next two timings (ms)

    def bench_encoder(model, device, seq, batch=32):
        calls.append(model)
        return {"batch": batch, "seq": seq, "ms": next(fake[model]), "tok_s": 0.0}

    monkeypatch.setattr(models, "bench_encoder", bench_encoder)
    rows = [{"runs": [{"batch": 4, "seq": 8, "ms": 3.0, "tok_s": 0.0}]} for _ in range(2)]
    models.retime_encoders([(rows[0], "a"), (rows[1], "b")], torch.device("cpu"), rounds=2)
    assert calls == ["b", "a", "a", "b"]  # reversed, then forward
    assert [r["runs"][0]["ms"] for r in rows] == [3.0, 3.0]  # medians of (3, 5, 1) and (3, 2, 9)
    assert rows[0]["runs"][0]["tok_s"] == 4 * 8 / 3e-3 and rows[0]["runs"][0]["rounds"] == 3
