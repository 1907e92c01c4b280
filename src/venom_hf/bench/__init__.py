"""Benchmarks and GPU checks, each a module with ``main(argv=None)`` (``python -m venom_hf.bench.<module>``,
or ``venom-hf bench <name>``):

* ``spmm`` (``venom-hf bench kernel``): the Spatha SpMM against cuBLAS dense and cuSPARSELt 2:4 per layer shape
* ``models`` (``bench model``): dense / 2:4 / V:2:M models, tokens/s, graph-captured decode step, memory
* ``hf_e2e`` (``bench e2e``): a real causal LM through the HF layer, masked vs packed vs reloaded
* ``multi_gpu`` (``bench multi-gpu``): DDP pruning and a ``device_map`` split over several GPUs
* ``generate`` (``bench generate``): ``generate`` with packed layers
* ``sanitize``: a set of small kernel calls for compute-sanitizer, and single calls for Nsight Compute

``scripts/gpu_check.sh`` runs them (with the GPU tests) into one output folder. A top layer: nothing in
format / kernels / modules / hf / pruning imports it.
"""
