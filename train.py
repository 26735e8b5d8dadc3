"""Train a dp-VAE: ``python train.py key=value ...`` (``--help`` lists every key).

With no arguments it trains on the embedded osmFISH dataset and writes ``run_dir/model.ckpt``,
``config.yaml`` and ``embedding.h5ad``; rerunning the same command resumes an interrupted run. The
same command is installed as ``dpvae-train``. Everything is built from ``conf/train.yaml`` by the
composition root, :func:`dpvae.pipeline.train`.
"""

from __future__ import annotations

from dpvae.cli import train_entry

if __name__ == "__main__":
    train_entry()
