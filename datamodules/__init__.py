"""LightningDataModules that stream reference spatial data to dpvae models.

In a checkout this is the top-level ``datamodules/`` folder; it is installed as
``dpvae.datamodules`` (the only name it is imported by).
"""

from __future__ import annotations

from .reference import CellDataset, ReferenceDataModule
from .sampling import BatchPlan, FixedBatches, PairedBatchSampler

__all__ = ["BatchPlan", "CellDataset", "FixedBatches", "PairedBatchSampler", "ReferenceDataModule"]
