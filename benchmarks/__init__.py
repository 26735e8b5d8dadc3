"""The project's benchmark, run from a checkout (``python -m benchmarks.protocol``), not installed.

- :mod:`benchmarks.protocol`: the spatial-reconstruction protocol of ``../shared/BENCHMARK.md``
  (hygiene, splits, scores, reports) for dp-VAE and its comparators;
- :mod:`benchmarks.comparators`: kNN regression and PCA-MDS on scanpy and scikit-learn, and
  wrappers of the published tools;
- :mod:`benchmarks.solver_scaling`: time and memory of dpvae's coordinate solver against size;
- :mod:`benchmarks.scale` (with :mod:`benchmarks.synthetic`): time and peak memory of training and
  prediction against the number of cells, in memory and streaming;
- :mod:`benchmarks.step`: a training step, bare PyTorch against Lightning, beside the FLOP floor,
  with its per-operation profile.

The method under test is reached only through :func:`dpvae.api.fit_predict`; nothing in ``dpvae``
imports this package. ``pip install -e ".[bench]"`` brings scikit-learn and scanpy.
"""
