"""dpvae: distance-preserving variational autoencoders for spatial single-cell data.

``dpvae.fit``, ``dpvae.load`` and ``dpvae.Model`` are the Python API (:mod:`dpvae.api`); they are
imported on first use, so ``import dpvae`` (and every command's ``--help``) stays fast.

Layers, each importing only the ones above it:

1. the maths: ``nn``, ``likelihoods``, ``regularizers``, ``module`` (the LightningModule),
   ``preprocess`` (the one preprocessing fit), ``solver``, ``metrics``, ``placement`` (the one owner
   of neighbour search, calibration and the embedding file), ``contracts``, ``io``, ``config``,
   ``plotting``, ``loggers``, and the torch-free ``errors`` (the option rules) and ``paths``
   (what a data or model argument names), which the commands check before any heavy import;
2. the application's wings: ``dpvae.datamodules`` and ``dpvae.callbacks`` (the checkout's
   ``datamodules/`` and ``callbacks/`` folders), which do not import each other;
3. the composition root ``pipeline``, then the front ends ``api``, ``cli``, ``predict``,
   ``run_folder``. ``tests/test_layers.py`` checks these rules.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

__all__ = ["Model", "__version__", "fit", "load"]


def __getattr__(name: str) -> Any:
    if name in ("Model", "fit", "load"):
        from dpvae import api

        return getattr(api, name)
    if name in ("data", "plotting", "metrics"):  # submodules a user reaches for
        import importlib

        return importlib.import_module(f"dpvae.{name}")
    raise AttributeError(f"module 'dpvae' has no attribute {name!r}")
