"""``venom-hf`` command line: ``demo`` (the README's main job), ``prune``, ``eval`` and ``bench``.

Every command has ``--help``. Mistakes a user can make (a bad V:N:M spec, a missing path, a model of the
wrong kind, no GPU for the kernel benchmark) print one ``venom-hf: error: ...`` line and exit with code 2,
without a traceback. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is fast.

The same commands are exposed as ``optimum-cli venom ...`` through optimum's ``optimum.commands.register``
namespace (``src/optimum/commands/register/venom_hf.py`` hands its arguments to :func:`main`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "venom-hf"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "Stocks fell sharply on Wall Street today.",
]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------------------------------------
def _spec_arg(value: str) -> str:
    from .format import VNMFormatError, VNMSpec

    try:
        return str(VNMSpec.parse(value))
    except VNMFormatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _existing_dir(value: str) -> str:
    if not os.path.isdir(value):
        what = "is a file, not a model folder" if os.path.exists(value) else "does not exist"
        raise argparse.ArgumentTypeError(f"model path {value!r} {what}")
    if not os.path.exists(os.path.join(value, "config.json")):
        raise argparse.ArgumentTypeError(f"model path {value!r} has no config.json (not a Hugging Face model folder)")
    return value


def _quiet_transformers(verbose: bool) -> None:
    if verbose:
        return
    import logging
    import warnings

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("venom_hf").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def _pick_device(choice: str):
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(choice)


def _device_line(device) -> str:
    import torch

    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)} (CUDA): packed layers run the Spatha kernel (venom::spmm)"
    return ("device: CPU -- no CUDA GPU, falling back to CPU. Packed layers run the *reference* path "
            "(unpack + dense matmul): it checks correctness and is not a fast kernel; speed-ups need an NVIDIA GPU")


def _table(rows: list[list], header: list[str], align: str | None = None) -> str:
    """A compact fixed-width table (``align``: one char per column, 'l' or 'r')."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def fmt(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _auto_class(path: str):
    """The Auto class matching the checkpoint's ``architectures`` (causal LM, classifier, or base model)."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    archs = getattr(cfg, "architectures", None) or []
    for suffix, auto in (("ForCausalLM", "AutoModelForCausalLM"),
                         ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForMaskedLM", "AutoModelForMaskedLM")):
        if any(a.endswith(suffix) for a in archs):
            return getattr(transformers, auto), cfg
    return transformers.AutoModel, cfg


def _load(path: str, device=None, **kw):
    import venom_hf  # noqa: F401 - registers the "venom" quantizer before from_pretrained

    cls, cfg = _auto_class(path)
    model = cls.from_pretrained(path, **kw).eval()
    if device is not None:
        model.to(device)
    return model, cfg


def _vnm_sparsity(model) -> tuple[int, float]:
    """(number of V:N:M layers, fraction of zeros over them)."""
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


# --------------------------------------------------------------------------------------------------------
# calibration / evaluation data
# --------------------------------------------------------------------------------------------------------
def _read_text_file(path: str) -> str:
    if not os.path.isfile(path):
        raise CLIError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise CLIError(f"text file {path!r} is empty")
    return text


def _calib_source(value: str) -> str:
    if value in ("bbc", "austen") or value.endswith(".txt") or os.path.isfile(value):
        return value
    raise argparse.ArgumentTypeError(f"--calib must be 'bbc', 'austen' or a .txt file, got {value!r}")


def calibration_batches(tokenizer, source: str, samples: int, seq_len: int, batch_size: int, seed: int = 0):
    """Calibration batches: ``samples`` BBC News training articles (truncated to ``seq_len`` tokens), or
    ``samples`` contiguous ``seq_len``-token windows of Jane Austen's *Emma* / a text file."""
    import torch

    from . import assets

    if source == "bbc":
        train = assets.bbc_news()["train"].shuffle(seed=seed)
        texts = train["text"][:samples]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return [dict(tokenizer(texts[i : i + batch_size], truncation=True, max_length=seq_len, padding=True,
                               return_tensors="pt")) for i in range(0, len(texts), batch_size)]
    text = assets.jane_austen()["emma"] if source == "austen" else _read_text_file(source)
    ids = tokenizer(text[: max(200_000, samples * seq_len * 8)], return_tensors="pt").input_ids[0]
    n = min(samples, ids.numel() // seq_len)
    if n == 0:
        raise CLIError(f"calibration text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    chunks = ids[: n * seq_len].view(n, seq_len)
    return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in chunks.split(batch_size)]


# --------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------
def _mean_pool(hidden, attention_mask):
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def _embed(model, batches):
    import torch

    outs = []
    with torch.no_grad():
        for b in batches:
            outs.append(_mean_pool(model(**b).last_hidden_state, b["attention_mask"]).float())
    return torch.cat(outs)


def _hidden(model, batches):
    import torch

    with torch.no_grad():
        return torch.cat([model(**b).last_hidden_state.float().flatten(0, 1) for b in batches])


def _time_forward(model, batch, repeats: int) -> float:
    """Median seconds per forward of ``batch`` after one warm-up."""
    import torch

    from .evaluation import sync

    device = batch["input_ids"].device
    ts = []
    with torch.no_grad():
        for r in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            model(**batch)
            sync(device)
            if r:
                ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def cmd_demo(args) -> int:
    """Prune the real all-MiniLM-L6-v2 to V:N:M (load-time magnitude and one-shot OBS), pack, save, reload,
    and compare outputs and speed with the dense model."""
    import tempfile

    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    import venom_hf
    from venom_hf import VNMConfig

    from . import assets
    from .format import VNMSpec
    from .modules import VNMMaskedLinear, VNMSparseLinear

    t_start = time.perf_counter()
    spec = VNMSpec.parse(args.spec)
    if not spec.packable:
        raise CLIError(f"the demo packs the model, which needs N = 2 (V:2:M); got {spec}. Try 64:2:8 or 64:2:16")
    device = _pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    path = assets.minilm_path()
    print(f"venom-hf demo: all-MiniLM-L6-v2 (BertModel, 22.7M params) at {path}")
    print(f"spec:   {spec} (V:N:M counts kept weights: {spec.sparsity:.1%} sparse)")
    print(_device_line(device) + f"; dtype {str(dtype)[6:]}")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))

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
    calib_texts = data["train"].shuffle(seed=0)["text"][: args.calib_samples]
    held_texts = data["test"]["text"][: args.eval_samples]

    def batches(texts, bs=16):
        return [tok(texts[i : i + bs], truncation=True, max_length=args.seq_len, padding=True,
                    return_tensors="pt").to(device) for i in range(0, len(texts), bs)]

    calib, held, sts = batches(calib_texts, 8), batches(held_texts), batches(SENTENCES)

    say(f"one-shot second-order pruning (method='obs', SparseGPT-style OBS) on {len(calib_texts)} BBC News "
        f"training articles x {args.seq_len} tokens")
    obs = AutoModel.from_pretrained(path, dtype=torch.float32).eval().to(device)  # Hessians in fp32
    t0 = time.perf_counter()
    report = venom_hf.prune(obs, calib, str(spec), method="obs", targets=list(VNMConfig(str(spec)).targets),
                            progress=True)
    obs_time = time.perf_counter() - t0
    obs.to(dtype)
    print(f"obs: {report['layers']} layers, sparsity {report['sparsity']:.4f}, {obs_time:.0f} s")

    say(f"compare with dense on {len(held_texts)} held-out BBC News test articles (mean-pooled embeddings)")
    e_dense, e_sts_dense = _embed(dense, held), _embed(dense, sts)
    rows, sims = [], {}
    for name, model, how in (("dense", dense, "-"), ("magnitude", magnitude, "sparsity_config= at load"),
                             ("obs", obs, f"venom_hf.prune, {obs_time:.0f} s")):
        cos = F.cosine_similarity(e_dense, _embed(model, held), dim=-1)
        _, sp = _vnm_sparsity(model)
        rows.append([name, how, f"{sp:.3f}", f"{cos.mean():.4f}", f"{cos.min():.4f}"])
        e = _embed(model, sts)
        sims[name] = F.cosine_similarity(e[:1], e[1:], dim=-1).tolist()
    print(_table(rows, ["model", "pruned by", "sparsity", "cos vs dense (mean)", "(min)"], "llrrr"))
    print(f"\nsimilarity to {SENTENCES[0]!r} (no recovery fine-tuning):")
    print(_table([[s] + [f"{sims[k][i]:.3f}" for k in sims] for i, s in enumerate(SENTENCES[1:])],
                 ["sentence"] + list(sims), "lrrr"))
    del e_sts_dense

    out_dir = args.out or tempfile.mkdtemp(prefix="venom_hf_demo_")
    os.makedirs(out_dir, exist_ok=True)
    say(f"compress -> packed (VNMSparseLinear), save_pretrained both formats into {out_dir}, reload")
    h_masked = _hidden(obs, held[:1])
    obs.save_pretrained(os.path.join(out_dir, "masked"))  # format "dense": exact zeros, loads in plain HF
    venom_hf.compress(obs)
    n_packed = sum(isinstance(m, VNMSparseLinear) for m in obs.modules())
    h_packed = _hidden(obs, held[:1])
    obs.save_pretrained(os.path.join(out_dir, "packed"))
    tok.save_pretrained(os.path.join(out_dir, "packed"))
    reloaded = AutoModel.from_pretrained(os.path.join(out_dir, "packed")).eval().to(device)
    n_reloaded = sum(isinstance(m, VNMSparseLinear) for m in reloaded.modules())
    h_reloaded = _hidden(reloaded, held[:1])
    scale = h_masked.abs().max().item()
    print(_table([
        ["packed vs masked (same weights)", f"{(h_packed - h_masked).abs().max():.2e}", f"{scale:.2f}"],
        ["reloaded packed vs in-memory packed", f"{(h_reloaded - h_packed).abs().max():.2e}", ""],
    ], ["last_hidden_state", "max |diff|", "max |h|"]))
    print(f"packed layers: {n_packed} in memory, {n_reloaded} after reload "
          f"({'round trip OK' if n_reloaded == n_packed else 'MISMATCH'})")
    dense_file = os.path.join(path, "model.safetensors")
    dense_bytes = os.path.getsize(dense_file)
    print("\ncheckpoint sizes (model.safetensors, " + str(dtype)[6:] + "):")
    print(_table([
        ["dense original", _mb(dense_bytes), "1.00x"],
        ["V:N:M format='dense' (zeros kept)", _mb(_dir_bytes(os.path.join(out_dir, "masked"))),
         f"{_dir_bytes(os.path.join(out_dir, 'masked')) / dense_bytes:.2f}x"],
        ["V:N:M format='packed'", _mb(_dir_bytes(os.path.join(out_dir, "packed"))),
         f"{_dir_bytes(os.path.join(out_dir, 'packed')) / dense_bytes:.2f}x"],
    ], ["checkpoint", "size", "vs dense"]))
    if dtype != torch.float32:
        print("(the dense original is fp32 on disk; the saved checkpoints are " + str(dtype)[6:] + ")")
    sd = obs.state_dict()
    packed_b = sum(t.numel() * t.element_size() for k, t in sd.items() if ".weight_" in k)
    linear_b = sum(m.out_features * m.in_features for m in obs.modules() if isinstance(m, VNMSparseLinear)) * \
        torch.finfo(dtype).bits // 8
    emb_b = sum(t.numel() * t.element_size() for k, t in sd.items() if "embeddings" in k)
    print(f"the {n_packed} pruned Linears: {_mb(linear_b)} dense -> {_mb(packed_b)} packed "
          f"({packed_b / linear_b:.2f}x: values + 8-bit column indices + 2:4 metadata); "
          f"the embeddings ({_mb(emb_b)}) stay dense")

    say(f"speed: forward of batch {args.bench_batch} x {args.seq_len} tokens, median of {args.repeats}")
    ids = tok(held_texts[: args.bench_batch] * (1 + args.bench_batch // max(1, len(held_texts))), truncation=True,
              max_length=args.seq_len, padding="max_length", return_tensors="pt").to(device)
    ids = {k: v[: args.bench_batch] for k, v in ids.items()}
    t_dense = _time_forward(dense, ids, args.repeats)
    t_masked = _time_forward(magnitude, ids, args.repeats)
    t_packed = _time_forward(reloaded, ids, args.repeats)
    h_unfused = _hidden(reloaded, held[:1])
    n_groups = venom_hf.fuse_projections(reloaded)  # query|key|value of each layer as one SpMM
    h_fused = _hidden(reloaded, held[:1])
    t_fused = _time_forward(reloaded, ids, args.repeats)
    print(f"fuse_projections: {n_groups} query|key|value groups, one SpMM each; max |diff| of last_hidden_state "
          f"vs unfused {(h_fused - h_unfused).abs().max():.2e}")
    ntok = ids["input_ids"].numel()
    print(_table([
        ["dense (nn.Linear)", f"{t_dense * 1e3:.1f}", f"{ntok / t_dense:,.0f}", "1.00x"],
        ["masked (VNMMaskedLinear)", f"{t_masked * 1e3:.1f}", f"{ntok / t_masked:,.0f}", f"{t_dense / t_masked:.2f}x"],
        ["packed (VNMSparseLinear)", f"{t_packed * 1e3:.1f}", f"{ntok / t_packed:,.0f}", f"{t_dense / t_packed:.2f}x"],
        ["packed + fuse_projections", f"{t_fused * 1e3:.1f}", f"{ntok / t_fused:,.0f}", f"{t_dense / t_fused:.2f}x"],
    ], ["layers", "ms / forward", "tokens/s", "speed vs dense"]))
    if device.type == "cpu":
        print("CPU: the packed path is the reference implementation (correctness, not speed). Run on an NVIDIA "
              "GPU for the Spatha kernel; model-level GPU numbers: `venom-hf bench model`.")

    say("done")
    print(f"total {time.perf_counter() - t_start:.0f} s; checkpoints in {out_dir}" +
          ("" if args.out else " (a temporary folder; --out DIR keeps them somewhere else)"))
    return 0


# --------------------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------------------
def cmd_prune(args) -> int:
    """One-shot V:N:M pruning of a checkpoint; writes a packed or dense checkpoint with its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    import venom_hf
    from venom_hf import VNMConfig

    from .format import VNMSpec
    from .hf.convert import _ensure_quantizer
    from .pruning import find_targets

    spec = VNMSpec.parse(args.spec)
    if args.format == "packed" and not spec.packable:
        raise CLIError(f"--format packed needs a V:2:M spec (the sparse tensor cores run 2:4), got {spec}; "
                       "use --format dense for N > 2")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists and is not empty (pass --overwrite to write into it)")
    device = _pick_device(args.device)
    print(f"venom-hf prune: {args.model_path} -> {args.out}")
    print(f"spec {spec} ({spec.sparsity:.1%} sparse), method {args.method}, format {args.format}")
    print(_device_line(device))
    _, cfg = _auto_class(args.model_path)
    qc = getattr(cfg, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        raise CLIError(f"{args.model_path!r} already has a quantization_config (quant_method={method!r}); "
                       "prune a dense checkpoint (remove quantization_config from config.json to prune again)")
    model, _ = _load(args.model_path, device=device, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_path)

    targets = list(args.targets) if args.targets else None
    default_cfg = VNMConfig(str(spec))
    if targets is None:
        found = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and default_cfg.is_target(n)]
        targets = list(default_cfg.targets) if found else None  # else: every Linear except heads/embeddings
    try:
        names = list(find_targets(model, targets))
    except ValueError as e:
        raise CLIError(str(e)) from None

    calib = None
    if args.method == "obs":
        print(f"calibration: {args.calib}, {args.calib_samples} samples x {args.seq_len} tokens")
        calib = calibration_batches(tok, args.calib, args.calib_samples, args.seq_len, args.batch_size)
        calib = [{k: v.to(device) for k, v in b.items()} for b in calib]
    report = venom_hf.prune(model, calib, str(spec), method=args.method, targets=names, progress=True)
    print(f"pruned {report['layers']} Linear layers to {spec}: sparsity {report['sparsity']:.4f} "
          f"in {report['time_s']:.1f} s")

    # The saved config lists the pruned modules, so that a reload rebuilds exactly these layers.
    qcfg = VNMConfig(str(spec), targets=targets if targets is not None else names, format="dense")
    selected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Module) and qcfg.is_target(n)
                and type(m).__name__ in ("Linear", "VNMMaskedLinear")}
    if selected != set(names):
        qcfg = VNMConfig(str(spec), targets=names, format="dense")
    _ensure_quantizer(model, qcfg)
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    if args.format == "packed":
        venom_hf.compress(model)
    model.to("cpu")
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    size = _dir_bytes(args.out)
    print(f"wrote {args.format} checkpoint ({_mb(size)}) and tokenizer to {args.out}")
    if args.format == "dense":
        print("format 'dense': exact zeros, loads in plain transformers too; `import venom_hf` keeps the masks")
    else:
        print("format 'packed': load it after `import venom_hf` (VNMSparseLinear layers)")
    return 0


# --------------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    """Perplexity (causal LM) on Jane Austen's *Persuasion* or a text file, or accuracy (sequence
    classifier) on the BBC News test split."""
    import json

    import torch
    from transformers import AutoTokenizer

    from . import assets
    from .evaluation import model_nbytes, perplexity

    device = _pick_device(args.device)
    _, cfg = _auto_class(args.model_path)
    archs = getattr(cfg, "architectures", None) or []
    if args.task == "ppl" and not any(a.endswith("ForCausalLM") for a in archs):
        raise CLIError(f"--task ppl needs a causal LM checkpoint (*ForCausalLM); {args.model_path!r} is "
                       f"{archs or 'a base model'}")
    if args.task == "accuracy" and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise CLIError(f"--task accuracy needs a sequence-classification checkpoint fine-tuned on BBC News "
                       f"(*ForSequenceClassification, 5 labels); {args.model_path!r} is {archs or 'a base model'}")
    print(f"venom-hf eval: {args.model_path}, task {args.task}")
    print(_device_line(device))
    model, cfg = _load(args.model_path, device=device)
    tok = AutoTokenizer.from_pretrained(args.model_path)
    n_layers, sparsity = _vnm_sparsity(model)
    result = {"model": args.model_path, "task": args.task, "device": str(device), "vnm_layers": n_layers,
              "vnm_sparsity": round(sparsity, 4), "param_MB": round(model_nbytes(model) / 2**20, 2)}
    t0 = time.perf_counter()
    if args.task == "ppl":
        if args.data == "austen":
            text, name = assets.jane_austen()["persuasion"], "Jane Austen, Persuasion"
        else:
            text, name = _read_text_file(args.data), args.data
        try:
            ppl = perplexity(model, tok, text, window=args.window, max_tokens=args.max_tokens,
                             batch_size=args.batch_size, progress=True)
        except ValueError as e:
            raise CLIError(str(e)) from None
        result.update(data=name, window=args.window, max_tokens=args.max_tokens, perplexity=round(ppl, 3))
    else:
        from tqdm.auto import tqdm

        if int(getattr(cfg, "num_labels", 0)) != 5:
            raise CLIError(f"BBC News has 5 classes; {args.model_path!r} has num_labels={cfg.num_labels}")
        test = assets.bbc_news()["test"]
        if args.max_samples:
            test = test.select(range(min(args.max_samples, len(test))))
        texts, labels = test["text"], test["label"]
        correct = 0
        with torch.no_grad():
            for i in tqdm(range(0, len(texts), args.batch_size), desc="accuracy", unit="batch"):
                enc = tok(texts[i : i + args.batch_size], truncation=True, max_length=args.seq_len, padding=True,
                          return_tensors="pt").to(device)
                pred = model(**enc).logits.argmax(-1).cpu()
                correct += int((pred == torch.as_tensor(labels[i : i + args.batch_size])).sum())
        result.update(data="BBC News test split", samples=len(texts), accuracy=round(correct / len(texts), 4))
    result["time_s"] = round(time.perf_counter() - t0, 1)
    metric = "perplexity" if args.task == "ppl" else "accuracy"
    print(_table([[result["data"], n_layers, f"{sparsity:.3f}", result[metric], result["time_s"]]],
                 ["data", "V:N:M layers", "sparsity", metric, "time (s)"], "lrrrr"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------
BENCH_SCRIPTS = {"kernel": "spmm.py", "model": "models.py"}


def cmd_bench(args) -> int:
    """Run benchmarks/spmm.py (kernel) or benchmarks/models.py (model) from the repository checkout."""
    import runpy

    script = os.path.join(REPO_ROOT, "benchmarks", BENCH_SCRIPTS[args.what])
    if not os.path.isfile(script):
        raise CLIError(f"{script} not found: the benchmarks live in the repository checkout "
                       "(run `venom-hf bench` from a clone installed with `pip install -e .`)")
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    wants_help = any(a in ("-h", "--help") for a in rest)
    if args.what == "kernel" and not wants_help:
        import torch

        if not torch.cuda.is_available():
            raise CLIError("the kernel benchmark needs a CUDA GPU (NVIDIA sm_80+; it times the Spatha kernel "
                           "against cuBLAS and cuSPARSELt) and torch sees none. `venom-hf bench model` runs on "
                           "CPU too (dense vs packed reference path)")
    shown = os.path.relpath(script)
    shown = script if shown.startswith("..") else shown
    print(f"venom-hf bench {args.what}: running {shown} {' '.join(rest)}".rstrip(), flush=True)
    src = os.path.join(REPO_ROOT, "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    old_argv = sys.argv
    sys.argv = [script, *rest]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # argparse --help / errors inside the script
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code
    finally:
        sys.argv = old_argv
    return 0


# --------------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------------
def add_commands(sub) -> None:
    """Add the venom-hf commands to an argparse subparsers object (shared with ``optimum-cli venom``)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("demo", formatter_class=fmt, help="the main job: prune the embedded MiniLM, pack, compare",
                       description=cmd_demo.__doc__ + " Uses the GPU when there is one; says when it falls back "
                       "to CPU. About 1-3 minutes on 2 CPU cores.")
    p.add_argument("--spec", type=_spec_arg, default="64:2:8", help="V:2:M pattern, counting kept weights")
    p.add_argument("--calib-samples", type=int, default=16, help="BBC News articles for the OBS Hessians")
    p.add_argument("--eval-samples", type=int, default=32, help="held-out BBC News articles compared with dense")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per article")
    p.add_argument("--bench-batch", type=int, default=16, help="batch size of the speed comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per model (median)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None, help="keep the saved checkpoints here (default: a temporary folder)")
    p.add_argument("-v", "--verbose", action="store_true", help="show transformers' warnings")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prune", formatter_class=fmt, help="one-shot V:N:M pruning of a checkpoint",
                       description=cmd_prune.__doc__ + " Targets: the attention and MLP projections (Llama/BERT "
                       "names) when the model has them, else every Linear except heads and embeddings.")
    p.add_argument("model_path", type=_existing_dir, help="a Hugging Face model folder (config.json + weights)")
    p.add_argument("--spec", type=_spec_arg, default="64:2:8", help="V:N:M pattern, counting kept weights")
    p.add_argument("--method", choices=["obs", "magnitude"], default="obs",
                   help="obs: layer-wise second order with calibration data (SparseGPT-style); magnitude: |w|")
    p.add_argument("--calib", type=_calib_source, default="bbc",
                   help="calibration data for obs: bbc (BBC News train), austen (Jane Austen's Emma) or FILE.txt")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=None,
                   help="module names, name suffixes or 're:<regex>' to prune; default: see the description)")
    p.add_argument("--out", required=True, help="output folder (save_pretrained + tokenizer)")
    p.add_argument("--format", choices=["packed", "dense"], default="packed",
                   help="packed: VNMSparseLinear tensors (needs N=2); dense: exact zeros, loads in plain HF")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="saved dtype")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("-v", "--verbose", action="store_true", help="show transformers' warnings")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", formatter_class=fmt, help="perplexity (causal LM) or BBC News accuracy (classifier)",
                       description=cmd_eval.__doc__)
    p.add_argument("model_path", type=_existing_dir, help="a Hugging Face model folder (dense, or a venom checkpoint)")
    p.add_argument("--task", choices=["ppl", "accuracy"], required=True)
    p.add_argument("--data", default="austen", help="ppl: 'austen' (Persuasion) or a .txt file")
    p.add_argument("--window", type=int, default=512, help="ppl: tokens per non-overlapping window")
    p.add_argument("--max-tokens", type=int, default=16384, help="ppl: tokens evaluated")
    p.add_argument("--max-samples", type=int, default=0, help="accuracy: test articles (0 = all 445)")
    p.add_argument("--seq-len", type=int, default=128, help="accuracy: tokens per article")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="show transformers' warnings")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmarks: kernel (SpMM, needs a CUDA GPU) or model (tokens/s, memory)",
                       description="Runs benchmarks/spmm.py (kernel: Spatha V:2:M SpMM vs cuBLAS dense vs "
                       "cuSPARSELt 2:4; needs a CUDA GPU) or benchmarks/models.py (model: dense / 2:4 / 64:2:8 / "
                       "64:2:16 tokens/s, peak memory, checkpoint size; CPU runs use the reference path) from the "
                       "repository checkout. Arguments after the target go to the script, e.g. "
                       "`venom-hf bench kernel --quick --out out/` or `venom-hf bench model --help`.")
    p.add_argument("what", choices=sorted(BENCH_SCRIPTS), help="kernel or model")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=cmd_bench)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="V:N:M (VENOM) sparsity for Hugging Face Transformers. V:N:M counts kept weights: "
        "64:2:8 keeps 2 of every 8 (75% sparse).",
        epilog="Each command has --help. Exit codes: 0 ok, 2 usage or input error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,prune,eval,bench}")
    add_commands(sub)
    return parser


def run_command(args) -> int:
    """Run a parsed command; user errors become one line on stderr and exit code 2."""
    from .format import VNMFormatError

    _quiet_transformers(getattr(args, "verbose", False))
    try:
        return int(args.func(args) or 0)
    except (CLIError, VNMFormatError) as e:
        print(f"{getattr(args, 'prog', PROG)} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # e.g. an offline asset package that is not installed
        print(f"{getattr(args, 'prog', PROG)} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{getattr(args, 'prog', PROG)}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    args.prog = prog
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
