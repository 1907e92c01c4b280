"""Evaluation helpers shared by the CLI, the examples and the experiments: perplexity, accuracy, speed.

``evaluate.load(<hub metric>)`` needs the network, so metrics are computed here with torch.
"""

from __future__ import annotations

import math
import time

import torch

__all__ = ["perplexity", "classification_accuracy", "generation_speed", "sync", "model_nbytes"]


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
def classification_accuracy(model, tokenizer, texts, labels, max_length: int = 128, batch_size: int = 32) -> float:
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        pred = model(**enc).logits.argmax(-1).cpu()
        correct += int((pred == torch.as_tensor(labels[i : i + batch_size])).sum())
    return correct / len(texts)


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
