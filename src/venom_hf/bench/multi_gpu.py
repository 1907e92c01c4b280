"""Several GPUs: DDP correctness and throughput of ``VNMPruningCallback``, and a ``device_map`` split of a packed
(``VNMSparseLinear``) model over two GPUs. ``scripts/gpu_check.sh --bench multi-gpu`` runs every step.

    python -m venom_hf.bench.multi_gpu ddp-check --out DIR [--tests tests]   # tests/test_ddp.py's worker, NCCL
    python -m venom_hf.bench.multi_gpu train --out DIR --tag g1              # throughput worker, one process
    accelerate launch --multi_gpu --num_processes 2 -m venom_hf.bench.multi_gpu train --out DIR --tag g2
    python -m venom_hf.bench.multi_gpu split --out DIR     # packed Llama: 1 GPU vs device_map over 2 GPUs
    python -m venom_hf.bench.multi_gpu summary --out DIR   # one table from the JSON files

Everything is built from configs with random weights and synthetic tokens: nothing is downloaded.
``train`` and ``split`` also run on CPU at toy sizes (``--cpu``, ``--tiny``) to debug them without a GPU.
``ddp-check`` runs the DDP test's worker, so it needs the repository's ``tests/`` folder (``--tests``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _env_info() -> dict:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import accelerate
        import transformers

        info.update(transformers=transformers.__version__, accelerate=accelerate.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cards"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            info["nccl"] = f"unknown ({e})"
    return info


# ------------------------------------------------------------------------------------------- a. ddp-check
def cmd_ddp_check(a):
    """tests/test_ddp.py's worker with the NCCL backend on 2 GPUs vs one GPU, same global batch."""
    path = os.path.join(a.tests, "test_ddp.py")
    if not os.path.isfile(path):
        print(f"ddp-check: {path} not found; it runs the repository's DDP test worker (pass --tests DIR of a "
              "checkout)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("test_ddp", path)
    test_ddp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_ddp)

    res = {"what": "tests/test_ddp.py worker, NCCL, 2 ranks on cuda:0/cuda:1 vs 1 GPU (same global batch)",
           "env": _env_info(), "passed": False}
    stats: dict = {}
    with tempfile.TemporaryDirectory() as d:
        try:
            res["wall_s"] = test_ddp.launch(d, a.backend, timeout=a.timeout)
            test_ddp.check_results(d, rtol=a.rtol, atol=a.atol, stats=stats)
            res["passed"] = True
        except BaseException as e:  # noqa: BLE001 - report, never stop the other measurements
            res["error"] = f"{type(e).__name__}: {e}"[-6000:]
            res["traceback"] = traceback.format_exc()[-4000:]
    res["stats"] = stats
    # the CPU test's tolerance, for the record (GPU float sums run in yet another order)
    if "final_max_abs_diff" in stats:
        res["would_pass_cpu_tolerance"] = stats["final_max_abs_diff"] <= test_ddp.ATOL + test_ddp.RTOL
    _dump(os.path.join(a.out, "ddp_check.json"), res)
    print(json.dumps({k: v for k, v in res.items() if k != "traceback"}, indent=1, default=str))
    if "traceback" in res:
        print(res["traceback"])
    return 0 if res["passed"] else 1


# ------------------------------------------------------------------------------------------- b. train
class _Tokens(torch.utils.data.Dataset):
    """Random token sequences; label = first token % num_labels (learnable)."""

    def __init__(self, n, seq, vocab, num_labels, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, vocab, (n, seq), generator=g)
        self.y = self.x[:, 0] % num_labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def cmd_train(a):
    """Gradual OBS pruning of a BERT-base-shaped model under Trainer; per-step times (one process per GPU)."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from venom_hf.pruning import VNMPruningCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    gpu = torch.cuda.is_available() and not a.cpu
    if a.tiny:
        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=512, num_labels=2)
    else:  # bert-base-uncased's shape
        cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    model.accepts_loss_kwargs = False  # see docs/distributed.md: plain mean loss on every rank
    steps = a.prune_steps
    cb = VNMPruningCallback(a.spec, start_step=steps[0], end_step=steps[-1], init_n=a.init_n,
                            num_steps=len(steps), ramp="linear", method="obs", num_grads=a.num_grads)
    window = cb._window_steps(1)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    class Start(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

    class End(TrainerCallback):  # after the pruning callback: a pruning step's time includes the OBS step
        def __init__(self):
            self.rows = []

        def on_step_end(self, args, state, control, **kw):
            sync()
            s = state.global_step
            kind = "prune" if s in steps else "fisher" if any(t - window < s <= t for t in steps) else "plain"
            self.rows.append((s, kind, time.perf_counter() - start.t0))

    start, end = Start(), End()
    gbatch = a.batch * world
    ds = _Tokens(a.steps * gbatch, a.seq, cfg.vocab_size, cfg.num_labels)
    args = TrainingArguments(
        os.path.join(tempfile.gettempdir(), f"vnm_train_{a.tag}"), max_steps=a.steps,
        per_device_train_batch_size=a.batch, learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0,
        bf16=gpu and a.dtype == "bf16", logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=not gpu,
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=2, dataloader_drop_last=True,
        ddp_backend=("nccl" if gpu else "gloo") if world > 1 else None)
    tr = Trainer(model=model, args=args, train_dataset=ds, callbacks=[start, cb, end])
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.train()
    sync()
    wall = time.perf_counter() - t0

    rows = end.rows
    meas = [r for r in rows if r[0] > a.warmup]
    by = {k: [r[2] for r in meas if r[1] == k] for k in ("plain", "fisher", "prune")}
    med = {k: statistics.median(v) if v else None for k, v in by.items()}
    res = {
        "tag": a.tag, "world": world, "device": torch.cuda.get_device_name() if gpu else "cpu",
        "model": "BertForSequenceClassification, bert-base shape (random init)" if not a.tiny else "tiny BERT",
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "dtype": a.dtype if gpu else "fp32",
        "seq": a.seq, "per_device_batch": a.batch, "global_batch": gbatch, "steps": a.steps,
        "warmup_steps_excluded": a.warmup, "prune_steps": steps, "spec": a.spec, "num_grads": a.num_grads,
        "fisher_window_steps": window,
        "median_step_s": med, "n_steps": {k: len(v) for k, v in by.items()},
        "samples_per_s_plain": gbatch / med["plain"] if med["plain"] else None,
        "samples_per_s_fisher_window": gbatch / med["fisher"] if med["fisher"] else None,
        # everything after warm-up: plain + Fisher-window + pruning steps, as a run would see it
        "samples_per_s_overall": gbatch * len(meas) / sum(r[2] for r in meas),
        "prune_step_s": by["prune"], "train_wall_s": wall,
        "history": cb.history, "rank_checks": cb._rank_checks,
        "final_sparsity": cb.sparsity_logs().get("vnm/sparsity"),
        "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "step_times": rows, "env": _env_info(),
    }
    zero_ok = all(bool((cb._modules[n].weight.detach()[~m] == 0).all()) for n, m in cb.masks.items())
    res["pruned_weights_zero"] = zero_ok
    if rank == 0:
        _dump(os.path.join(a.out, f"train_{a.tag}.json"), res)
        short = {k: v for k, v in res.items() if k not in ("step_times", "history", "env")}
        print(json.dumps(short, indent=1, default=str))
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return 0


# ------------------------------------------------------------------------------------------- c. split
def _greedy(model, ids, new):
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].cpu()


def cmd_split(a):
    """Packed 64:2:8 Llama (random, from a config): one GPU vs ``device_map="auto"`` over two GPUs."""
    import venom_hf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from venom_hf import VNMConfig, VNMSparseLinear
    from venom_hf.evaluation import generation_speed

    gpu = torch.cuda.is_available() and not a.cpu
    ndev = torch.cuda.device_count() if gpu else 0
    dtype = torch.float16 if gpu else torch.float32
    if a.tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.intermediate,
                          num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                          num_key_value_heads=max(1, a.hidden // 256), max_position_embeddings=2048)
    res = {"what": "packed (VNMSparseLinear) Llama-shaped random model: 1 GPU vs device_map over 2 GPUs",
           "spec": a.spec, "env": _env_info(), "config": {k: getattr(cfg, k) for k in (
               "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads")}, "dtype": str(dtype)}
    dev0 = "cuda:0" if gpu else "cpu"
    with tempfile.TemporaryDirectory() as d:
        dense_dir, packed_dir = os.path.join(d, "dense"), os.path.join(d, "packed")
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(dtype).save_pretrained(dense_dir)
        t0 = time.perf_counter()
        masked = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype, device_map=dev0,
                                                      sparsity_config=VNMConfig(a.spec)).eval()
        packed = venom_hf.compress(masked, progress=False)
        res["packed_layers"] = sum(isinstance(m, VNMSparseLinear) for m in packed.modules())
        packed.save_pretrained(packed_dir)
        res["prepare_s"] = time.perf_counter() - t0
        res["packed_checkpoint_MB"] = sum(os.path.getsize(os.path.join(packed_dir, f))
                                          for f in os.listdir(packed_dir)) / 2**20
        del masked, packed

        g = torch.Generator().manual_seed(1)
        prompts = {b: torch.randint(1, cfg.vocab_size, (b, a.prompt), generator=g) for b in (1, 8)}

        def measure(model, label):
            dev = model.device
            out = {}
            with torch.no_grad():
                ids = prompts[8].to(dev)
                out["logits"] = model(ids).logits.float().cpu()
                out["tokens"] = _greedy(model, ids, a.new)
            out["speed"] = {}
            for b, p in prompts.items():
                s = generation_speed(model, p.to(dev), new_tokens=a.new, repeats=a.repeats)
                s.pop("ids")
                out["speed"][f"b{b} p{a.prompt}"] = s
            print(label, {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in out["speed"].items()},
                  flush=True)
            return out

        one = AutoModelForCausalLM.from_pretrained(packed_dir, dtype=dtype, device_map=dev0).eval()
        res["one_gpu_packed_layers"] = sum(isinstance(m, VNMSparseLinear) for m in one.modules())
        r1 = measure(one, "1 GPU")
        del one
        if gpu:
            torch.cuda.empty_cache()
        # device_map="auto" with a cap of 90 % of the checkpoint on each GPU: the model cannot sit on one GPU.
        # With transformers 5.17 "auto" still did not use GPU 0 for this packed model (2x H100: {"model": 1,
        # "lm_head": "disk"}): get_balanced_memory caps GPU 0 at ~half the model + 1.25 decoder layers and
        # infer_auto_device_map reserves the largest layer (the 62.5 MiB embedding) there, leaving less than the
        # embedding. transformers 5.24 splits it; "sequential" does too. Hence the explicit fallback below.
        budget = int(res["packed_checkpoint_MB"] * 2**20 * 0.9)
        two = gpu and ndev >= 2
        max_memory = {0: budget, 1: budget} if two else {"cpu": int(budget * 0.6)}  # CPU: a cpu/disk split
        res["max_memory"] = {str(k): v for k, v in max_memory.items()}
        kw = {} if two else {"offload_folder": os.path.join(d, "offload")}
        split = AutoModelForCausalLM.from_pretrained(packed_dir, dtype=dtype, device_map="auto",
                                                     max_memory=max_memory, **kw).eval()
        dmap = dict(getattr(split, "hf_device_map", None) or {"": str(split.device)})
        res["device_map_mode"] = "auto"
        if two and {str(v) for v in dmap.values()} != {"0", "1"}:
            # fallback: an explicit half/half map (embeddings + first half of the layers on GPU 0)
            res["auto_device_map_rejected"] = {k: str(v) for k, v in dmap.items()}
            del split
            half = cfg.num_hidden_layers // 2
            dmap = {"model.embed_tokens": 0, **{f"model.layers.{i}": int(i >= half) for i in
                                                range(cfg.num_hidden_layers)},
                    "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
            split = AutoModelForCausalLM.from_pretrained(packed_dir, dtype=dtype, device_map=dmap).eval()
            dmap = dict(getattr(split, "hf_device_map", None) or {"": str(split.device)})
            res["device_map_mode"] = "explicit (auto did not split)"
        placements = {}
        for mod, devc in dmap.items():
            placements.setdefault(str(devc), []).append(mod)
        res["device_map"] = {k: len(v) for k, v in placements.items()}
        res["hf_device_map"] = {k: str(v) for k, v in dmap.items()}
        res["split_packed_layers_by_device"] = {}
        for m in split.modules():
            if isinstance(m, VNMSparseLinear):
                ts = list(m.parameters()) + list(m.buffers())
                dv = str(ts[0].device) if ts else "?"
                res["split_packed_layers_by_device"][dv] = res["split_packed_layers_by_device"].get(dv, 0) + 1
        r2 = measure(split, "2 GPUs" if gpu else "cpu+disk")
        del split

    res["max_abs_logit_diff"] = float((r1["logits"] - r2["logits"]).abs().max())
    res["logits_bitwise_equal"] = bool(torch.equal(r1["logits"], r2["logits"]))
    res["greedy_tokens_equal"] = bool(torch.equal(r1["tokens"], r2["tokens"]))
    res["greedy_new_tokens"] = a.new
    res["greedy_batch"] = 8
    res["speed"] = {"one_gpu": r1["speed"], "two_gpus": r2["speed"]}
    res["decode_ratio_2gpu_over_1gpu"] = {k: r2["speed"][k]["decode_tok_s"] / r1["speed"][k]["decode_tok_s"]
                                         for k in r1["speed"]}
    res["passed"] = res["greedy_tokens_equal"] and (
        {"0", "1"} <= set(res["device_map"]) if gpu and ndev >= 2 else True)
    _dump(os.path.join(a.out, "split.json"), res)
    print(json.dumps(res, indent=1, default=str))
    return 0 if res["passed"] else 1


# ------------------------------------------------------------------------------------------- summary
def cmd_summary(a):
    def load(name):
        p = os.path.join(a.out, name)
        return json.load(open(p)) if os.path.exists(p) else None

    chk, t1, t2, sp = load("ddp_check.json"), load("train_g1.json"), load("train_g2.json"), load("split.json")
    s: dict = {}
    lines = []
    if chk:
        st = chk.get("stats", {})
        s["ddp_check"] = {"passed": chk["passed"], "final_max_abs_diff": st.get("final_max_abs_diff"),
                          "mask_entries_differing_from_single": st.get("mask_entries_differing_from_single"),
                          "ranks_bitwise_equal": st.get("ranks_bitwise_equal"), "error": chk.get("error")}
        lines.append(f"a. DDP check ({st.get('backend')}, 2 ranks vs 1): passed={chk['passed']}  final max|dW|="
                     f"{st.get('final_max_abs_diff')}  masks differing from 1-GPU run: "
                     f"{st.get('mask_entries_differing_from_single')}  error={chk.get('error')}")
    else:
        lines.append("a. DDP check: no result")
    if t1 and t2:
        eff = {k: t2[k] / (2 * t1[k]) for k in ("samples_per_s_plain", "samples_per_s_fisher_window",
                                               "samples_per_s_overall") if t1.get(k) and t2.get(k)}
        s["train"] = {"g1": {k: t1[k] for k in ("samples_per_s_plain", "samples_per_s_fisher_window",
                                                 "samples_per_s_overall", "prune_step_s", "median_step_s")},
                      "g2": {k: t2[k] for k in ("samples_per_s_plain", "samples_per_s_fisher_window",
                                                 "samples_per_s_overall", "prune_step_s", "median_step_s")},
                      "scaling_efficiency": eff, "launcher_g2": a.launcher}
        lines.append("b. throughput (samples/s)   1 GPU   2 GPUs   efficiency")
        for k, lab in (("samples_per_s_plain", "plain steps"), ("samples_per_s_fisher_window", "Fisher window"),
                       ("samples_per_s_overall", "whole run")):
            if t1.get(k) and t2.get(k):
                lines.append(f"   {lab:22s} {t1[k]:8.1f} {t2[k]:8.1f}   {eff[k]:.3f}")
        lines.append(f"   pruning steps (s): 1 GPU {[round(x, 2) for x in t1['prune_step_s']]}, "
                     f"2 GPUs {[round(x, 2) for x in t2['prune_step_s']]}")
    else:
        lines.append(f"b. throughput: missing ({'g1' if not t1 else ''} {'g2' if not t2 else ''})")
    if sp:
        s["split"] = {k: sp.get(k) for k in ("device_map", "max_abs_logit_diff", "greedy_tokens_equal",
                                             "speed", "decode_ratio_2gpu_over_1gpu", "passed")}
        lines.append(f"c. device_map split: {sp.get('device_map')}  max|dlogit|={sp.get('max_abs_logit_diff')}  "
                     f"greedy equal={sp.get('greedy_tokens_equal')}")
        for k in sp.get("speed", {}).get("one_gpu", {}):
            o, t = sp["speed"]["one_gpu"][k], sp["speed"]["two_gpus"][k]
            lines.append(f"   {k}: decode tok/s 1 GPU {o['decode_tok_s']:.1f}  2 GPUs {t['decode_tok_s']:.1f}; "
                         f"prefill tok/s {o['prefill_tok_s']:.0f} / {t['prefill_tok_s']:.0f}")
    else:
        lines.append("c. device_map split: no result")
    s["lines"] = lines
    _dump(os.path.join(a.out, "summary.json"), s)
    print("\n".join(lines))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ddp-check", help="tests/test_ddp.py's worker on 2 GPUs (NCCL) vs 1 GPU")
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--timeout", type=int, default=150)
    p.add_argument("--tests", default="tests", help="the repository's tests/ folder (holds test_ddp.py)")
    p = sub.add_parser("train", help="VNMPruningCallback throughput (one process per GPU)")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prune-steps", type=int, nargs="+", default=[20, 40])
    p.add_argument("--init-n", type=int, default=4)
    p.add_argument("--spec", default="64:2:8")
    p.add_argument("--num-grads", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p = sub.add_parser("split", help="packed Llama: 1 GPU vs device_map over 2 GPUs")
    p.add_argument("--out", required=True)
    p.add_argument("--spec", default="64:2:8")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p = sub.add_parser("summary", help="one table from the JSON files of --out")
    p.add_argument("--out", required=True)
    p.add_argument("--launcher", default="")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    return {"ddp-check": cmd_ddp_check, "train": cmd_train, "split": cmd_split, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
