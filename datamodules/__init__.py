"""LightningDataModules that stream reference spatial data to dpvae models.

In a checkout this is the top-level ``datamodules/`` folder; it is installed as
``dpvae.datamodules`` (the only name it is imported by).
"""

from __future__ import annotations

from .reference import CellDataset, PairedBatchSampler, ReferenceDataModule

__all__ = ["CellDataset", "PairedBatchSampler", "ReferenceDataModule"]
