"""Demo and example support, outside the core library: the offline assets (``venom_hf.demo.assets``: MiniLM,
SmolLM2-135M, BBC News, Jane Austen), the named calibration / evaluation data of the CLI
(``venom_hf.demo.data``) and the ``venom-hf demo`` job (``venom_hf.demo.minilm``).

Used by the CLI's ``demo`` / ``prune`` / ``eval`` commands, the benchmarks, ``experiments/`` and the example
notebooks; nothing in format / kernels / modules / hf / pruning imports it.
"""
