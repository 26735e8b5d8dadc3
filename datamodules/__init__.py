"""LightningDataModules that stream reference spatial data to dpvae models."""

from __future__ import annotations

from datamodules.reference import CellDataset, PairedBatchSampler, ReferenceDataModule

__all__ = ["CellDataset", "PairedBatchSampler", "ReferenceDataModule"]
