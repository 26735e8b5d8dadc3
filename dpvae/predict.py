"""``python -m dpvae.predict key=value ...``: place a query's cells with a trained model.

The same command as ``dpvae-predict``; ``--help`` lists every key (``conf/predict.yaml``). From
Python, use :func:`dpvae.load` and :meth:`dpvae.Model.predict`.
"""

from __future__ import annotations

from dpvae.cli import predict_entry
from dpvae.cli import predict_main as main

__all__ = ["main"]

if __name__ == "__main__":
    predict_entry()
