"""``venom-hf`` command line: ``demo`` (the README's main job), ``prune``, ``eval``, ``bench`` and ``tune``.

Every command has ``--help``. Mistakes a user can make (a bad V:N:M spec, a missing path, a model of the
wrong kind, no GPU for the kernel benchmark) print one ``venom-hf: error: ...`` line and exit with code 2,
without a traceback. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is fast.

The same commands are exposed as ``optimum-cli venom ...`` through optimum's ``optimum.commands.register``
namespace (``src/optimum/commands/register/venom_hf.py`` hands its arguments to :func:`main`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from .console import CLIError, device_line, dir_bytes, mb, pick_device, table

PROG = "venom-hf"


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


def _calib_source(value: str) -> str:
    from .demo.data import is_calib_source

    if is_calib_source(value):
        return value
    raise argparse.ArgumentTypeError(f"--calib must be 'bbc', 'austen' or a .txt file, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    """Prune the real all-MiniLM-L6-v2 to V:N:M (load-time magnitude and one-shot OBS), pack, save, reload,
    and compare outputs and speed with the dense model."""
    from .demo.minilm import run_demo

    return run_demo(spec=args.spec, device=args.device, calib_samples=args.calib_samples,
                    eval_samples=args.eval_samples, seq_len=args.seq_len, bench_batch=args.bench_batch,
                    repeats=args.repeats, threads=args.threads, out=args.out)


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
    from .hf.names import DEFAULT_TARGETS, selected
    from .hf.quantizer import _ensure_quantizer
    from .pruning import find_targets

    spec = VNMSpec.parse(args.spec)
    if args.format == "packed" and not spec.packable:
        raise CLIError(f"--format packed needs a V:2:M spec (2:4 is what the sparse tensor cores execute), got {spec}; "
                       "use --format dense for N > 2")
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists and is not empty (pass --overwrite to write into it)")
    device = pick_device(args.device)
    print(f"venom-hf prune: {args.model_path} -> {args.out}")
    print(f"spec {spec} ({spec.sparsity:.1%} sparse), method {args.method}, format {args.format}")
    print(device_line(device))
    _, cfg = _auto_class(args.model_path)
    qc = getattr(cfg, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        raise CLIError(f"{args.model_path!r} already has a quantization_config (quant_method={method!r}); "
                       "prune a dense checkpoint (remove quantization_config from config.json to prune again)")
    model, _ = _load(args.model_path, device=device, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_path)

    targets = list(args.targets) if args.targets else None
    if targets is None and any(isinstance(m, torch.nn.Linear) and selected(n, DEFAULT_TARGETS)
                               for n, m in model.named_modules()):
        targets = list(DEFAULT_TARGETS)  # else: every Linear except heads / embeddings (DEFAULT_IGNORE)
    try:
        names = list(find_targets(model, targets))
    except ValueError as e:
        raise CLIError(str(e)) from None

    calib = None
    if args.method == "obs":
        from .demo.data import calibration_batches

        print(f"calibration: {args.calib}, {args.calib_samples} samples x {args.seq_len} tokens")
        try:
            calib = calibration_batches(tok, args.calib, args.calib_samples, args.seq_len, args.batch_size)
        except ValueError as e:
            raise CLIError(str(e)) from None
        calib = [{k: v.to(device) for k, v in b.items()} for b in calib]
    report = venom_hf.prune(model, calib, str(spec), method=args.method, targets=names, progress=True)
    print(f"pruned {report['layers']} Linear layers to {spec}: sparsity {report['sparsity']:.4f} "
          f"in {report['time_s']:.1f} s")

    # The saved config names what was pruned, so that a reload rebuilds exactly these layers: the patterns
    # (VNMConfig and find_targets select the same modules by them), or the names when no pattern was given.
    qcfg = VNMConfig(str(spec), targets=targets if targets is not None else names, format="dense")
    _ensure_quantizer(model, qcfg)
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    if args.format == "packed":
        venom_hf.compress(model)
    model.to("cpu")
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    size = dir_bytes(args.out)
    print(f"wrote {args.format} checkpoint ({mb(size)}) and tokenizer to {args.out}")
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

    from transformers import AutoTokenizer

    from .demo import assets
    from .demo.data import read_text_file
    from .evaluation import classification_accuracy, model_nbytes, perplexity, vnm_sparsity

    device = pick_device(args.device)
    _, cfg = _auto_class(args.model_path)
    archs = getattr(cfg, "architectures", None) or []
    if args.task == "ppl" and not any(a.endswith("ForCausalLM") for a in archs):
        raise CLIError(f"--task ppl needs a causal LM checkpoint (*ForCausalLM); {args.model_path!r} is "
                       f"{archs or 'a base model'}")
    if args.task == "accuracy" and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise CLIError(f"--task accuracy needs a sequence-classification checkpoint fine-tuned on BBC News "
                       f"(*ForSequenceClassification, 5 labels); {args.model_path!r} is {archs or 'a base model'}")
    print(f"venom-hf eval: {args.model_path}, task {args.task}")
    print(device_line(device))
    model, cfg = _load(args.model_path, device=device)
    tok = AutoTokenizer.from_pretrained(args.model_path)
    n_layers, sparsity = vnm_sparsity(model)
    result = {"model": args.model_path, "task": args.task, "device": str(device), "vnm_layers": n_layers,
              "vnm_sparsity": round(sparsity, 4), "param_MB": round(model_nbytes(model) / 2**20, 2)}
    t0 = time.perf_counter()
    if args.task == "ppl":
        try:
            if args.data == "austen":
                text, name = assets.jane_austen()["persuasion"], "Jane Austen, Persuasion"
            else:
                text, name = read_text_file(args.data), args.data
            ppl = perplexity(model, tok, text, window=args.window, max_tokens=args.max_tokens,
                             batch_size=args.batch_size, progress=True)
        except ValueError as e:
            raise CLIError(str(e)) from None
        result.update(data=name, window=args.window, max_tokens=args.max_tokens, perplexity=round(ppl, 3))
    else:
        if int(getattr(cfg, "num_labels", 0)) != 5:
            raise CLIError(f"BBC News has 5 classes; {args.model_path!r} has num_labels={cfg.num_labels}")
        test = assets.bbc_news()["test"]
        if args.max_samples:
            test = test.select(range(min(args.max_samples, len(test))))
        acc = classification_accuracy(model, tok, test["text"], test["label"], max_length=args.seq_len,
                                      batch_size=args.batch_size, progress=True)
        result.update(data="BBC News test split", samples=len(test), accuracy=round(acc, 4))
    result["time_s"] = round(time.perf_counter() - t0, 1)
    metric = "perplexity" if args.task == "ppl" else "accuracy"
    print(table([[result["data"], n_layers, f"{sparsity:.3f}", result[metric], result["time_s"]]],
                 ["data", "V:N:M layers", "sparsity", metric, "time (s)"], "lrrrr"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------
# command name -> (module of venom_hf.bench, what it measures)
BENCHMARKS = {
    "kernel": ("spmm", "Spatha V:2:M SpMM vs cuBLAS dense vs cuSPARSELt 2:4 per layer shape (needs a CUDA GPU)"),
    "model": ("models", "dense / 2:4 / V:2:M models: tokens/s, graph-captured decode step, peak memory, "
                        "checkpoint size (CPU runs use the reference path)"),
    "e2e": ("hf_e2e", "a real causal LM through the HF layer: masked vs packed greedy tokens, reload, "
                      "device_map split, tokens/s"),
    "multi-gpu": ("multi_gpu", "DDP pruning (masks, throughput) and a device_map split over GPUs"),
    "generate": ("generate", "HF generate with packed layers: tokens/s"),
}


def cmd_bench(args) -> int:
    """Run one benchmark of ``venom_hf.bench`` with the arguments that follow its name."""
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
    return _run_bench_module(BENCHMARKS[args.what][0], rest, f"{getattr(args, 'prog', PROG)} bench {args.what}")


def _run_bench_module(module_name: str, rest: list[str], prog: str) -> int:
    name = f"venom_hf.bench.{module_name}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise CLIError(f"{name} is not part of this venom_hf installation") from None
    old_argv = sys.argv
    sys.argv = [prog, *rest]  # the module's argparse names itself after argv[0] in its usage line
    try:
        return int(module.main(rest) or 0)
    except SystemExit as e:  # argparse --help / usage errors inside the module
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return 0 if e.code is None else int(e.code)
    finally:
        sys.argv = old_argv


def cmd_tune(args) -> int:
    """Time every shipped tile config on this GPU for a model's layer shapes and write the dispatch table
    that the kernels read at run time (venom_hf.bench.tune)."""
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not any(a in ("-h", "--help") for a in rest):
        import torch

        if not torch.cuda.is_available():
            raise CLIError("tuning times the Spatha kernels on a CUDA GPU (NVIDIA sm_80+), and torch sees none; "
                           "without a table the kernels use their built-in heuristic")
    return _run_bench_module("tune", rest, f"{getattr(args, 'prog', PROG)} tune")


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

    listing = "; ".join(f"{name}: {what}" for name, (_, what) in BENCHMARKS.items())
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS) + " (kernel needs a CUDA GPU)",
                       description=f"Runs a benchmark of venom_hf.bench ({listing}). Arguments after the name go "
                       "to the benchmark, e.g. `venom-hf bench kernel --quick --out out/` or "
                       "`venom-hf bench model --help`; `python -m venom_hf.bench.<module>` runs the same.")
    p.add_argument("what", choices=list(BENCHMARKS), help=", ".join(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_bench)

    # add_help=False: --help goes on to venom_hf.bench.tune, whose parser lists the options
    p = sub.add_parser("tune", add_help=False,
                       help="measure the kernels' tile configs on this GPU and write its dispatch table",
                       description=cmd_tune.__doc__)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for venom_hf.bench.tune")
    p.set_defaults(func=cmd_tune)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="V:N:M (VENOM) sparsity for Hugging Face Transformers. V:N:M counts kept weights: "
        "64:2:8 keeps 2 of every 8 (75% sparse).",
        epilog="Each command has --help. Exit codes: 0 ok, 2 usage or input error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,prune,eval,bench,tune}")
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
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "tune":  # tune hands everything after its name to venom_hf.bench.tune
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.args = extra + list(args.args)
    args.prog = prog
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
