"""Evaluation helpers shared by the CLI, the demo, the benchmarks, the examples and the experiments:
perplexity, accuracy, embeddings, V:N:M sparsity, speed, and the batches they run on.

``evaluate.load(<hub metric>)`` needs the network, so metrics are computed here with torch. This module is a
top layer (like ``venom_hf.cli``): nothing in format / kernels / modules / hf / pruning imports it.
"""

from __future__ import annotations

import math
import time

import torch

__all__ = ["perplexity", "classification_accuracy", "generation_speed", "sync", "model_nbytes", "text_batches",
           "token_windows", "mean_pool", "embed", "hidden_states", "time_forward", "vnm_sparsity"]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 512, max_tokens: int = 16384, batch_size: int = 4,
               progress: bool = False) -> float:
    """Perplexity over non-overlapping ``window``-token windows of the first ``max_tokens`` tokens."""
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: max_tokens]
    n = (ids.numel() // window) * window
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    chunks = ids[:n].view(-1, window)
    nll, count = 0.0, 0
    it = range(0, chunks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="perplexity", unit="batch")
    model.eval()
    for i in it:
        batch = chunks[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def classification_accuracy(model, tokenizer, texts, labels, max_length: int = 128, batch_size: int = 32,
                            progress: bool = False) -> float:
    """Accuracy of a sequence classifier (argmax of the logits) on ``texts`` truncated to ``max_length`` tokens."""
    if not len(texts):
        raise ValueError("classification_accuracy: no texts")
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    it = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="accuracy", unit="batch")
    for i in it:
        enc = tokenizer(list(texts[i : i + batch_size]), truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        pred = model(**enc).logits.argmax(-1).cpu()
        correct += int((pred == torch.as_tensor(labels[i : i + batch_size])).sum())
    return correct / len(texts)


def text_batches(tokenizer, texts, seq_len: int, batch_size: int, device=None) -> list[dict]:
    """Tokenized batches of ``texts`` (each truncated to ``seq_len`` tokens, padded per batch); a tokenizer
    without a pad token pads with its end-of-sequence token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch_size):
        b = tokenizer(list(texts[i : i + batch_size]), truncation=True, max_length=seq_len, padding=True,
                      return_tensors="pt")
        out.append({k: v.to(device) if device is not None else v for k, v in b.items()})
    return out


def token_windows(tokenizer, text: str, samples: int, seq_len: int, batch_size: int) -> list[dict]:
    """Batches of ``samples`` contiguous ``seq_len``-token windows from the start of ``text`` (fewer when the
    text is short; ``ValueError`` when it has not one window)."""
    ids = tokenizer(text[: max(200_000, samples * seq_len * 8)], return_tensors="pt").input_ids[0]
    n = min(samples, ids.numel() // seq_len)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    chunks = ids[: n * seq_len].view(n, seq_len)
    return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in chunks.split(batch_size)]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attended positions (sentence-transformers' pooling)."""
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    """Mean-pooled ``last_hidden_state`` of an encoder over ``batches`` (fp32, one row per sequence)."""
    return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]).float() for b in batches])


@torch.no_grad()
def hidden_states(model, batches) -> torch.Tensor:
    """``last_hidden_state`` of every token of ``batches`` as one fp32 (tokens, hidden) tensor."""
    return torch.cat([model(**b).last_hidden_state.float().flatten(0, 1) for b in batches])


@torch.no_grad()
def time_forward(model, batch: dict, repeats: int) -> float:
    """Median seconds per forward of ``batch`` after one warm-up."""
    device = batch["input_ids"].device
    ts = []
    for r in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        model(**batch)
        sync(device)
        if r:
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def vnm_sparsity(model) -> tuple[int, float]:
    """(number of V:N:M layers, fraction of zero weights over them) of a masked or packed model."""
    from .modules import VNMMaskedLinear, VNMSparseLinear

    n = zeros = total = 0
    for m in model.modules():
        if isinstance(m, VNMMaskedLinear):
            n += 1
            total += m.weight.numel()
            zeros += int((~m.mask).sum())
        elif isinstance(m, VNMSparseLinear):
            n += 1
            total += m.out_features * m.in_features
            zeros += m.out_features * m.in_features - int((m.to_linear().weight != 0).sum())
    return n, (zeros / total if total else 0.0)


@torch.no_grad()
def generation_speed(model, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Prefill tokens/s (one forward over the prompt batch) and decode tokens/s (greedy, KV cache).

    Returns medians over ``repeats`` after one warm-up, plus the generated ids of the last run.
    """
    device = input_ids.device
    model.eval()
    prefill, decode = [], []
    out = None
    for r in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        sync(device)
        t1 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=getattr(model.generation_config, "eos_token_id", None) or 0)
        sync(device)
        t2 = time.perf_counter()
        if r:  # the first run is the warm-up (kernel compiles, allocator growth)
            prefill.append(input_ids.numel() / (t1 - t0))
            # generate() runs one prefill then new_tokens-1 decode steps; take the prefill off its time
            decode.append(input_ids.shape[0] * (new_tokens - 1) / max(1e-9, (t2 - t1) - (t1 - t0)))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"prefill_tok_s": med(prefill), "decode_tok_s": med(decode), "ids": out}


def model_nbytes(model) -> int:
    """Bytes of all parameters and persistent buffers (what a checkpoint holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
