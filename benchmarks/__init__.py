"""The project's benchmark, run from a checkout (``python -m benchmarks.protocol``), not installed.

- :mod:`benchmarks.protocol`: the spatial-reconstruction protocol of ``../shared/BENCHMARK.md``
  (hygiene, splits, scores, reports) for dp-VAE and its comparators;
- :mod:`benchmarks.comparators`: kNN regression and PCA-MDS on scanpy and scikit-learn, and
  wrappers of the published tools;
- :mod:`benchmarks.solver_scaling`: time and memory of dpvae's coordinate solver against size.

The method under test is reached only through :func:`dpvae.api.fit_predict`; nothing in ``dpvae``
imports this package. ``pip install -e ".[bench]"`` brings scikit-learn and scanpy.
"""
