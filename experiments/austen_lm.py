"""SmolLM2-135M on Jane Austen at 64:2:8: dense vs one-shot (magnitude, OBS) vs gradual (OBS) pruning.

Train / calibrate on five novels, perplexity on *Persuasion* (non-overlapping windows).

    PYTHONPATH=src python experiments/austen_lm.py --out out/austen             # reduced CPU run
    PYTHONPATH=src python experiments/austen_lm.py --quick --out out/austen_q   # smoke test

Writes results.json, results.md and ppl.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time

import torch


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    model.eval()
    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    for s in range(0, ids.numel() - 1, window):
        x = ids[s : s + window + 1].to(dev)
        if x.numel() < 2:
            break
        out = model(input_ids=x[None, :-1], use_cache=False)
        nll += torch.nn.functional.cross_entropy(out.logits[0].float(), x[1:], reduction="sum").item()
        n += x.numel() - 1
    return math.exp(nll / n)


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, seq: int):
        self.x = ids[: (ids.numel() // seq) * seq].view(-1, seq)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/austen_lm")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--spec", default="64:2:8")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps of the gradual / dense fine-tune runs")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib", type=int, default=32, help="calibration sequences for one-shot")
    ap.add_argument("--num-grads", type=int, default=16)
    ap.add_argument("--init-n", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up, fraction of --steps")
    ap.add_argument("--prune-start", type=float, default=0.1, help="first pruning step, fraction of --steps")
    ap.add_argument("--prune-end", type=float, default=0.6, help="last pruning step, fraction of --steps")
    ap.add_argument("--kd", action="store_true", help="gradual runs distill from the dense model (KL, T = 2)")
    ap.add_argument("--model", default=None, help="HF folder of SmolLM2 (default: venom_hf.demo.assets.smollm2_path())")
    ap.add_argument("--texts", default=None, help="JSON (.gz) {title: text} of the novels (default: venom_hf.demo.assets)")
    ap.add_argument("--export-texts", default=None, help="write the novels as JSON (.gz) into this file and exit")
    ap.add_argument("--runs", nargs="*", default=["dense", "dense-ft", "oneshot-magnitude", "oneshot-obs", "gradual-obs"],
                    help="any of dense, dense-ft, oneshot-{magnitude,obs}, gradual-{magnitude,obs}")
    a = ap.parse_args(argv)
    if a.export_texts:
        from venom_hf.demo.assets import jane_austen

        _write_json(a.export_texts, jane_austen())
        return
    if a.quick:
        a.seq, a.steps, a.eval_tokens, a.calib, a.num_grads = 64, 6, 1024, 4, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    import venom_hf
    from venom_hf.demo import assets
    from venom_hf.pruning import DistillationLoss, VNMPruningCallback

    path = a.model or assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    books = _read_json(a.texts) if a.texts else assets.jane_austen()
    train_titles = sorted(t for t in books if "ersuasion" not in t)
    test_title = next(t for t in books if "ersuasion" in t)
    train_ids = torch.tensor(tok("\n\n".join(books[t] for t in train_titles))["input_ids"])
    test_ids = torch.tensor(tok(books[test_title])["input_ids"])[: a.eval_tokens + 1]
    window = min(512, a.eval_tokens)
    ds = _Chunks(train_ids, a.seq)
    rng = random.Random(0)
    calib = [{"input_ids": ds[i]["input_ids"][None]} for i in rng.sample(range(len(ds)), a.calib)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)

    def targs(run):
        return TrainingArguments(os.path.join(tempfile.gettempdir(), "vnm_austen", run), max_steps=a.steps,
                                 per_device_train_batch_size=a.bs, learning_rate=a.lr, weight_decay=0.0,
                                 warmup_steps=max(1, int(a.warmup * a.steps)), logging_steps=max(1, a.steps // 10),
                                 save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
                                 use_cpu=device == "cpu", tf32=True if device == "cuda" else None)

    res = {"device": dev_name, "args": vars(a), "train_books": train_titles, "test_book": test_title,
           "train_tokens": int(train_ids.numel()), "eval_tokens": int(test_ids.numel() - 1), "runs": []}

    def record(run, model, t0, **extra):
        ppl = perplexity(model, test_ids, window)
        res["runs"].append({"run": run, "ppl": ppl, "time_s": time.time() - t0, **extra})
        print(f"{run}: Persuasion perplexity {ppl:.2f} ({time.time() - t0:.0f} s)", flush=True)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)

    for run in a.runs:
        set_seed(0)
        t0 = time.time()
        model = load()
        if run == "dense":
            record(run, model, t0)
        elif run == "dense-ft":
            Trainer(model=model, args=targs(run), train_dataset=ds).train()
            record(run, model, t0, steps=a.steps)
        elif run.startswith("oneshot-"):
            method = run.split("-", 1)[1]
            rep = venom_hf.prune(model, calib, a.spec, method=method)
            record(run, model, t0, sparsity=rep["sparsity"], prune_s=rep["time_s"], calib_seqs=a.calib)
        elif run.startswith("gradual-"):
            method = run.split("-", 1)[1]
            start, end = max(1, int(a.prune_start * a.steps)), int(a.prune_end * a.steps)
            cb = VNMPruningCallback(a.spec, start_step=start, end_step=end, init_n=a.init_n,
                                    ramp="linear", method=method, num_grads=a.num_grads)
            teacher = load() if a.kd else None
            kd = DistillationLoss(teacher, model, temperature=2.0, hardness=1.0) if a.kd else None
            Trainer(model=model, args=targs(run), train_dataset=ds, callbacks=[cb], compute_loss_func=kd).train()
            if kd is not None:
                kd.remove()
                del teacher, kd
            record(run, model, t0, steps=a.steps, kd=a.kd, sparsity=cb.history[-1]["sparsity"],
                   schedule=[(h["step"], h["spec"]) for h in cb.history],
                   prune_time_s=sum(h["prune_time_s"] for h in cb.history),
                   fisher_mib=max(h["fisher_mib"] for h in cb.history))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_reports(res, a.out)


def _write_json(path: str, obj) -> None:
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "wt", encoding="utf-8") as f:
        json.dump(obj, f)


def _read_json(path: str):
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def write_reports(res, out):
    lines = [f"# SmolLM2-135M on Jane Austen, {res['args']['spec']} ({res['device']})", "",
             f"Train: {', '.join(res['train_books'])} ({res['train_tokens']} tokens); "
             f"perplexity on the first {res['eval_tokens']} tokens of {res['test_book']}.", "",
             "| run | perplexity | sparsity | time (s) |", "|---|---|---|---|"]
    for r in res["runs"]:
        sp = f"{r['sparsity'] * 100:.1f} %" if "sparsity" in r else "0"
        lines.append(f"| {r['run']} | {r['ppl']:.2f} | {sp} | {r['time_s']:.0f} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["run"] for r in res["runs"]]
    bars = ax.bar(names, [r["ppl"] for r in res["runs"]], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("Persuasion perplexity (log)")
    ax.set_title(f"SmolLM2-135M, {res['args']['spec']} ({res['device']})", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppl.png"), dpi=120)


if __name__ == "__main__":
    main()
