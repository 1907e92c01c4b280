"""`venom-hf` command line: ``venom-hf demo`` (the README's main job) and friends."""

from __future__ import annotations

import argparse
import sys

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "Stocks fell sharply on Wall Street today.",
]


def _mean_pool(hidden, attention_mask):
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def cmd_demo(args) -> int:
    """Prune the real all-MiniLM-L6-v2 to V:N:M and compare sentence embeddings with the dense model."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from . import assets
    from .format import VNMSpec, check_mask, make_mask

    spec = VNMSpec.parse(args.spec)
    path = assets.minilm_path()
    print(f"model: all-MiniLM-L6-v2 ({path})\nspec:  {spec} ({spec.sparsity:.1%} sparse)")
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sparse = AutoModel.from_pretrained(path).eval()
    print(f"\n{'layer':<45} {'shape':>12} {'sparsity':>9}")
    total = kept = 0
    for name, mod in sparse.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("encoder."):
            mask = make_mask(mod.weight, spec)
            check_mask(mask, spec)
            with torch.no_grad():
                mod.weight.mul_(mask)
            total += mask.numel()
            kept += int(mask.sum())
            print(f"{name:<45} {str(tuple(mod.weight.shape)):>12} {1 - mask.float().mean().item():>9.3f}")
    print(f"{'encoder Linears':<45} {'':>12} {1 - kept / total:>9.3f}")
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        e_dense = _mean_pool(dense(**batch).last_hidden_state, batch["attention_mask"])
        e_sparse = _mean_pool(sparse(**batch).last_hidden_state, batch["attention_mask"])
    cos = F.cosine_similarity(e_dense, e_sparse, dim=-1)
    print(f"\ncosine(dense, sparse) of each sentence embedding (1.0 = identical):")
    for s, c in zip(SENTENCES, cos.tolist()):
        print(f"  {c:6.3f}  {s}")
    sim_d = F.cosine_similarity(e_dense[:1], e_dense[1:], dim=-1)
    sim_s = F.cosine_similarity(e_sparse[:1], e_sparse[1:], dim=-1)
    print(f"\nsimilarity to {SENTENCES[0]!r}: dense vs {spec} (no recovery fine-tuning)")
    for s, a, b in zip(SENTENCES[1:], sim_d.tolist(), sim_s.tolist()):
        print(f"  {a:6.3f} {b:6.3f}  {s}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="venom-hf", description="V:N:M sparsity for Hugging Face Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the main job: prune the embedded MiniLM model and compare with dense")
    p.add_argument("--spec", default="64:2:8", help="V:N:M pattern, counting kept weights (default 64:2:8)")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
