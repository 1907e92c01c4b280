"""The demo (``venom-hf demo``, ``scripts/demo.sh``): the real all-MiniLM-L6-v2 pruned to V:N:M at load time
(magnitude) and by one-shot OBS on BBC News, packed, saved in both formats, reloaded, and compared with the dense
model (embeddings, checkpoint sizes, speed)."""

from __future__ import annotations

import os
import tempfile
import time

from ..console import CLIError, device_line, dir_bytes, mb, pick_device, table
from ..evaluation import embed, hidden_states, text_batches, time_forward, vnm_sparsity

__all__ = ["run_demo", "SENTENCES"]

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "Stocks fell sharply on Wall Street today.",
]


def run_demo(spec: str = "64:2:8", device: str = "auto", calib_samples: int = 16, eval_samples: int = 32,
             seq_len: int = 128, bench_batch: int = 16, repeats: int = 3, threads: int = 2,
             out: str | None = None) -> int:
    """Prune the real all-MiniLM-L6-v2 to V:N:M (load-time magnitude and one-shot OBS), pack, save, reload,
    and compare outputs and speed with the dense model; prints each step. ``out``: keep the checkpoints
    there (default: a temporary folder). Returns 0."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    import venom_hf
    from venom_hf import VNMConfig

    from ..format import VNMSpec
    from ..modules import VNMMaskedLinear, VNMSparseLinear
    from . import assets

    t_start = time.perf_counter()
    spec = VNMSpec.parse(spec)
    if not spec.packable:
        raise CLIError(f"the demo packs the model, which needs N = 2 (V:2:M); got {spec}. Try 64:2:8 or 64:2:16")
    device = pick_device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    path = assets.minilm_path()
    print(f"venom-hf demo: all-MiniLM-L6-v2 (BertModel, 22.7M params) at {path}")
    print(f"spec:   {spec} (V:N:M counts kept weights: {spec.sparsity:.1%} sparse)")
    print(device_line(device) + f"; dtype {str(dtype)[6:]}")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))

    step = 0

    def say(msg):
        nonlocal step
        step += 1
        print(f"\n[{step}/6] {msg}  (t={time.perf_counter() - t_start:.0f}s)", flush=True)

    say("load: dense, and magnitude-pruned while loading with sparsity_config=VNMConfig(...)")
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path, dtype=dtype).eval().to(device)
    magnitude = AutoModel.from_pretrained(path, dtype=dtype, sparsity_config=VNMConfig(str(spec))).eval().to(device)
    n_masked = sum(isinstance(m, VNMMaskedLinear) for m in magnitude.modules())
    print(f"magnitude model: {n_masked} VNMMaskedLinear layers (Q, K, V, attention-out, FFN up/down x 6 blocks)")

    data = assets.bbc_news()
    calib_texts = data["train"].shuffle(seed=0)["text"][: calib_samples]
    held_texts = data["test"]["text"][: eval_samples]

    calib = text_batches(tok, calib_texts, seq_len, 8, device)
    held = text_batches(tok, held_texts, seq_len, 16, device)
    sts = text_batches(tok, SENTENCES, seq_len, 16, device)

    say(f"one-shot second-order pruning (method='obs', SparseGPT-style OBS) on {len(calib_texts)} BBC News "
        f"training articles x {seq_len} tokens")
    obs = AutoModel.from_pretrained(path, dtype=torch.float32).eval().to(device)  # Hessians in fp32
    t0 = time.perf_counter()
    report = venom_hf.prune(obs, calib, str(spec), method="obs", targets=list(VNMConfig(str(spec)).targets),
                            progress=True)
    obs_time = time.perf_counter() - t0
    obs.to(dtype)
    print(f"obs: {report['layers']} layers, sparsity {report['sparsity']:.4f}, {obs_time:.0f} s")

    say(f"compare with dense on {len(held_texts)} held-out BBC News test articles (mean-pooled embeddings)")
    e_dense = embed(dense, held)
    rows, sims = [], {}
    for name, model, how in (("dense", dense, "-"), ("magnitude", magnitude, "sparsity_config= at load"),
                             ("obs", obs, f"venom_hf.prune, {obs_time:.0f} s")):
        cos = F.cosine_similarity(e_dense, embed(model, held), dim=-1)
        _, sp = vnm_sparsity(model)
        rows.append([name, how, f"{sp:.3f}", f"{cos.mean():.4f}", f"{cos.min():.4f}"])
        e = embed(model, sts)
        sims[name] = F.cosine_similarity(e[:1], e[1:], dim=-1).tolist()
    print(table(rows, ["model", "pruned by", "sparsity", "cos vs dense (mean)", "(min)"], "llrrr"))
    print(f"\nsimilarity to {SENTENCES[0]!r} (no recovery fine-tuning):")
    print(table([[s] + [f"{sims[k][i]:.3f}" for k in sims] for i, s in enumerate(SENTENCES[1:])],
                 ["sentence"] + list(sims), "lrrr"))

    out_dir = out or tempfile.mkdtemp(prefix="venom_hf_demo_")
    os.makedirs(out_dir, exist_ok=True)
    say(f"compress -> packed (VNMSparseLinear), save_pretrained both formats into {out_dir}, reload")
    h_masked = hidden_states(obs, held[:1])
    obs.save_pretrained(os.path.join(out_dir, "masked"))  # format "dense": exact zeros, loads in plain HF
    venom_hf.compress(obs)
    n_packed = sum(isinstance(m, VNMSparseLinear) for m in obs.modules())
    h_packed = hidden_states(obs, held[:1])
    obs.save_pretrained(os.path.join(out_dir, "packed"))
    tok.save_pretrained(os.path.join(out_dir, "packed"))
    reloaded = AutoModel.from_pretrained(os.path.join(out_dir, "packed")).eval().to(device)
    n_reloaded = sum(isinstance(m, VNMSparseLinear) for m in reloaded.modules())
    h_reloaded = hidden_states(reloaded, held[:1])
    scale = h_masked.abs().max().item()
    print(table([
        ["packed vs masked (same weights)", f"{(h_packed - h_masked).abs().max():.2e}", f"{scale:.2f}"],
        ["reloaded packed vs in-memory packed", f"{(h_reloaded - h_packed).abs().max():.2e}", ""],
    ], ["last_hidden_state", "max |diff|", "max |h|"]))
    print(f"packed layers: {n_packed} in memory, {n_reloaded} after reload "
          f"({'round trip OK' if n_reloaded == n_packed else 'MISMATCH'})")
    dense_file = os.path.join(path, "model.safetensors")
    dense_bytes = os.path.getsize(dense_file)
    print("\ncheckpoint sizes (model.safetensors, " + str(dtype)[6:] + "):")
    print(table([
        ["dense original", mb(dense_bytes), "1.00x"],
        ["V:N:M format='dense' (zeros kept)", mb(dir_bytes(os.path.join(out_dir, "masked"))),
         f"{dir_bytes(os.path.join(out_dir, 'masked')) / dense_bytes:.2f}x"],
        ["V:N:M format='packed'", mb(dir_bytes(os.path.join(out_dir, "packed"))),
         f"{dir_bytes(os.path.join(out_dir, 'packed')) / dense_bytes:.2f}x"],
    ], ["checkpoint", "size", "vs dense"]))
    if dtype != torch.float32:
        print("(the dense original is fp32 on disk; the saved checkpoints are " + str(dtype)[6:] + ")")
    sd = obs.state_dict()
    packed_b = sum(t.numel() * t.element_size() for k, t in sd.items() if ".weight_" in k)
    linear_b = sum(m.out_features * m.in_features for m in obs.modules() if isinstance(m, VNMSparseLinear)) * \
        torch.finfo(dtype).bits // 8
    emb_b = sum(t.numel() * t.element_size() for k, t in sd.items() if "embeddings" in k)
    print(f"the {n_packed} pruned Linears: {mb(linear_b)} dense -> {mb(packed_b)} packed "
          f"({packed_b / linear_b:.2f}x: values + 8-bit column indices + 2:4 metadata); "
          f"the embeddings ({mb(emb_b)}) stay dense")

    say(f"speed: forward of batch {bench_batch} x {seq_len} tokens, median of {repeats}")
    ids = tok(held_texts[: bench_batch] * (1 + bench_batch // max(1, len(held_texts))), truncation=True,
              max_length=seq_len, padding="max_length", return_tensors="pt").to(device)
    ids = {k: v[: bench_batch] for k, v in ids.items()}
    t_dense = time_forward(dense, ids, repeats)
    t_masked = time_forward(magnitude, ids, repeats)
    # a loaded packed checkpoint runs query|key|value of each layer as one SpMM; unfused for comparison
    n_groups = venom_hf.unfuse_projections(reloaded)
    t_packed = time_forward(reloaded, ids, repeats)
    h_unfused = hidden_states(reloaded, held[:1])
    venom_hf.fuse_projections(reloaded)
    h_fused = hidden_states(reloaded, held[:1])
    t_fused = time_forward(reloaded, ids, repeats)
    print(f"fuse_projections: {n_groups} query|key|value groups, one SpMM each; max |diff| of last_hidden_state "
          f"vs unfused {(h_fused - h_unfused).abs().max():.2e}")
    ntok = ids["input_ids"].numel()
    print(table([
        ["dense (nn.Linear)", f"{t_dense * 1e3:.1f}", f"{ntok / t_dense:,.0f}", "1.00x"],
        ["masked (VNMMaskedLinear)", f"{t_masked * 1e3:.1f}", f"{ntok / t_masked:,.0f}", f"{t_dense / t_masked:.2f}x"],
        ["packed, unfused (VNMSparseLinear)", f"{t_packed * 1e3:.1f}", f"{ntok / t_packed:,.0f}", f"{t_dense / t_packed:.2f}x"],
        ["packed (q|k|v fused: the default)", f"{t_fused * 1e3:.1f}", f"{ntok / t_fused:,.0f}", f"{t_dense / t_fused:.2f}x"],
    ], ["layers", "ms / forward", "tokens/s", "speed vs dense"]))
    if device.type == "cpu":
        print("CPU: the packed path is the reference implementation (correctness, not speed). Run on an NVIDIA "
              "GPU for the Spatha kernel; model-level GPU numbers: `venom-hf bench model`.")

    say("done")
    print(f"total {time.perf_counter() - t_start:.0f} s; checkpoints in {out_dir}" +
          ("" if out else " (a temporary folder; --out DIR keeps them somewhere else)"))
    return 0
