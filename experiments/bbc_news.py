"""all-MiniLM-L6-v2 on BBC News: dense vs gradual magnitude vs gradual second-order (oBERT) V:N:M pruning.

Every pruned run starts from the same dense fine-tuned model and gets the same budget and schedule
(start/end step, linear ramp, KD from the dense model); only the spec and the method change.

    PYTHONPATH=src python experiments/bbc_news.py --out out/bbc            # full (GPU: a few minutes)
    PYTHONPATH=src python experiments/bbc_news.py --quick --out out/bbc_q  # smoke test (CPU, ~1 min)
    # offline GPU machine: --assets .assets/bbc (minilm/ in fp16 + bbc.json, see --export-assets)

Writes results.json, results.md and accuracy.png into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch

SPECS = ["1:2:4", "64:2:8", "64:2:16"]
INIT_N = {4: 3, 8: 5, 16: 9}  # the original recipes' first levels (5:8, 9:16); 3:4 for classic 2:4


def load_data(assets: str | None):
    if assets:
        with open(os.path.join(assets, "bbc.json")) as f:
            d = json.load(f)
        return os.path.join(assets, "minilm"), d
    from venom_hf.demo import assets as A

    ds = A.bbc_news(seed=0)
    d = {s: {"text": list(ds[s]["text"]), "label": [int(x) for x in ds[s]["label"]]} for s in ("train", "test")}
    d["labels"] = ds["train"].features["label"].names
    return A.minilm_path(), d


def export_assets(out: str):
    """Write minilm/ (fp16, 45 MB) and bbc.json into ``out`` (to carry to an offline GPU machine)."""
    from transformers import AutoModel, AutoTokenizer

    path, d = load_data(None)
    os.makedirs(out, exist_ok=True)
    AutoModel.from_pretrained(path, dtype=torch.float16).save_pretrained(os.path.join(out, "minilm"))
    AutoTokenizer.from_pretrained(path).save_pretrained(os.path.join(out, "minilm"))
    with open(os.path.join(out, "bbc.json"), "w") as f:
        json.dump(d, f)


class _DS(torch.utils.data.Dataset):
    def __init__(self, enc, labels):
        self.enc, self.labels = enc, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.labels[i]
        return item


@torch.no_grad()
def accuracy(model, ds, collator, bs=64):
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, len(ds), bs):
        batch = collator([ds[j] for j in range(i, min(i + bs, len(ds)))])
        batch = {k: v.to(dev) for k, v in batch.items()}
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(ds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/bbc_news")
    ap.add_argument("--assets", default=None, help="folder with minilm/ and bbc.json (default: venom_hf.demo.assets)")
    ap.add_argument("--export-assets", default=None, help="write the carried assets into this folder and exit")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dense-epochs", type=float, default=3)
    ap.add_argument("--prune-epochs", type=float, default=10)
    ap.add_argument("--prune-end", type=float, default=0.6, help="last pruning step, fraction of the pruned run")
    ap.add_argument("--num-grads", type=int, default=64)
    ap.add_argument("--damp", type=float, default=1e-7)
    ap.add_argument("--ramp", default="linear")
    ap.add_argument("--no-kd", action="store_true")
    ap.add_argument("--specs", nargs="*", default=SPECS)
    ap.add_argument("--methods", nargs="*", default=["magnitude", "obs"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the dense run (and of the pruned runs by default)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None,
                    help="seeds of the pruned runs (their data order); all start from the same dense model")
    ap.add_argument("--plot-only", action="store_true", help="redraw results.md/accuracy.png from results.json")
    a = ap.parse_args(argv)
    if a.export_assets:
        export_assets(a.export_assets)
        return
    os.makedirs(a.out, exist_ok=True)
    if a.plot_only:
        with open(os.path.join(a.out, "results.json")) as f:
            write_reports(json.load(f), a.out)
        return

    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from venom_hf.pruning import DistillationLoss, VNMPruningCallback

    if a.quick:
        a.max_len, a.dense_epochs, a.prune_epochs, a.num_grads = 64, 1, 2, 4
    path, data = load_data(a.assets)
    if a.quick:
        for s, n in (("train", 96), ("test", 48)):
            data[s] = {k: v[:n] for k, v in data[s].items()}
    tok = AutoTokenizer.from_pretrained(path)
    enc = {s: tok(data[s]["text"], truncation=True, max_length=a.max_len) for s in ("train", "test")}
    train = _DS(dict(enc["train"]), data["train"]["label"])
    test = _DS(dict(enc["test"]), data["test"]["label"])
    collator = DataCollatorWithPadding(tok)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    steps_per_epoch = -(-len(train) // a.bs)

    def targs(run, epochs, seed):
        return TrainingArguments(os.path.join(tempfile.gettempdir(), "vnm_bbc_news", run), num_train_epochs=epochs, per_device_train_batch_size=a.bs,
                                 learning_rate=a.lr, weight_decay=0.01, warmup_steps=int(0.06 * steps_per_epoch * epochs),
                                 logging_steps=50, save_strategy="no", report_to=[], seed=seed, disable_tqdm=True,
                                 use_cpu=not cuda, dataloader_num_workers=0)

    results = {"device": device_name, "args": vars(a), "runs": []}
    set_seed(a.seed)
    dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data["labels"]), dtype=torch.float32)
    t0 = time.time()
    Trainer(model=dense, args=targs("dense", a.dense_epochs, a.seed), train_dataset=train, data_collator=collator).train()
    acc = accuracy(dense, test, collator)
    results["runs"].append({"run": "dense", "spec": "dense", "method": "dense", "accuracy": acc,
                            "train_s": time.time() - t0, "epochs": a.dense_epochs})
    print(f"dense: accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    dense_state = copy.deepcopy(dense.state_dict())
    dense.eval()

    total = int(steps_per_epoch * a.prune_epochs)
    start, end = steps_per_epoch // 2, int(a.prune_end * total)
    results["schedule"] = {"start_step": start, "end_step": end, "total_steps": total, "ramp": a.ramp, "init_n": INIT_N}
    runs = [(spec, method, seed) for seed in (a.seeds or [a.seed]) for spec in a.specs for method in a.methods]
    for spec, method, seed in runs:
        m = int(spec.split(":")[2])
        run = f"{method}-{spec}-s{seed}"
        set_seed(seed)
        student = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(data["labels"]), dtype=torch.float32)
        student.load_state_dict(dense_state)
        cb = VNMPruningCallback(spec, start_step=start, end_step=end, init_n=INIT_N.get(m, m - 1), ramp=a.ramp,
                                method=method, num_grads=a.num_grads, damp=a.damp)
        kd = None if a.no_kd else DistillationLoss(dense, student, temperature=2.0, hardness=1.0)
        tr = Trainer(model=student, args=targs(run, a.prune_epochs, seed), train_dataset=train, data_collator=collator,
                     callbacks=[cb], compute_loss_func=kd)
        t0 = time.time()
        tr.train()
        dt = time.time() - t0
        if kd is not None:
            kd.remove()
        acc = accuracy(student, test, collator)
        results["runs"].append({"run": run, "spec": spec, "method": method, "seed": seed, "accuracy": acc,
                                "train_s": dt,
                                "epochs": a.prune_epochs, "sparsity": cb.history[-1]["sparsity"],
                                "schedule": [(h["step"], h["spec"]) for h in cb.history],
                                "prune_time_s": sum(h["prune_time_s"] for h in cb.history),
                                "fisher_mib": max(h["fisher_mib"] for h in cb.history),
                                "num_grads": [h["num_grads"] for h in cb.history]})
        print(f"{run}: accuracy {acc:.4f}, sparsity {cb.history[-1]['sparsity']:.4f}, {dt:.0f} s "
              f"(pruning {results['runs'][-1]['prune_time_s']:.1f} s)", flush=True)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_reports(results, a.out)


def write_reports(results, out):
    runs = results["runs"]
    dense = next(r for r in runs if r["method"] == "dense")
    specs = [s for s in dict.fromkeys(r["spec"] for r in runs) if s != "dense"]
    seeds = sorted({r.get("seed", 0) for r in runs if r["method"] != "dense"})
    lines = [f"# BBC News, all-MiniLM-L6-v2 ({results['device']})", "",
             f"Dense: **{dense['accuracy'] * 100:.2f} %** test accuracy ({dense['epochs']} epochs).", "",
             f"Pruned runs: mean over seeds {seeds} (min-max in brackets); the difference is the mean of the per-seed "
             "differences.", "",
             "| spec | magnitude | second order (OBS) | OBS - magnitude | seeds where OBS > magnitude |",
             "|---|---|---|---|---|"]

    def cell(v):
        if not v:
            return "-"
        lo, hi = min(v) * 100, max(v) * 100
        return f"{sum(v) / len(v) * 100:.2f} %" + (f" [{lo:.2f}-{hi:.2f}]" if len(v) > 1 else "")

    for s in specs:
        acc = {m: {r.get("seed", 0): r["accuracy"] for r in runs if r["spec"] == s and r["method"] == m}
               for m in ("magnitude", "obs")}
        both = sorted(set(acc["magnitude"]) & set(acc["obs"]))
        d = [acc["obs"][k] - acc["magnitude"][k] for k in both]
        diff = f"{sum(d) / len(d) * 100:+.2f}" if d else "-"
        wins = f"{sum(x > 0 for x in d)} of {len(d)}" if d else "-"
        mag, obs = cell(list(acc["magnitude"].values())), cell(list(acc["obs"].values()))
        lines.append(f"| {s} | {mag} | {obs} | {diff} | {wins} |")
    lines += ["", "Schedule: " + json.dumps(results.get("schedule", {})), ""]
    for r in runs[1:]:
        lines.append(f"* {r['run']}: path {' -> '.join(f'{sp}@{st}' for st, sp in r['schedule'])}; "
                     f"train {r['train_s']:.0f} s, pruning {r['prune_time_s']:.1f} s, Fisher {r['fisher_mib']:.0f} MiB, "
                     f"grads per step {r['num_grads']}")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = 0.38
    for i, meth in enumerate(["magnitude", "obs"]):
        vals = [[r["accuracy"] * 100 for r in runs if r["spec"] == s and r["method"] == meth] for s in specs]
        ys = [sum(v) / len(v) if v else 0 for v in vals]
        err = [[y - min(v) if v else 0 for y, v in zip(ys, vals)], [max(v) - y if v else 0 for y, v in zip(ys, vals)]]
        bars = ax.bar([j + (i - 0.5) * w for j in range(len(specs))], ys, w, label=meth,
                      yerr=err if len(seeds) > 1 else None, capsize=3)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(dense["accuracy"] * 100, color="k", ls="--", lw=1, label="dense")
    ax.set_xticks(range(len(specs)), specs)
    ax.set_ylabel("test accuracy (%)")
    lo = min([r["accuracy"] * 100 for r in runs] + [90])
    ax.set_ylim(lo - 2, 100.5)
    ax.set_title(f"MiniLM-L6 on BBC News, gradual V:N:M ({results['device']})", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)


if __name__ == "__main__":
    main()
