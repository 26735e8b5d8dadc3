"""What the pipeline and the callbacks may read from a datamodule: the reference-data contract.

A datamodule that trains a :class:`dpvae.module.DPVAE` implements :class:`ReferenceData` (and is a
``lightning.LightningDataModule``, whose batches are dicts of ``raw`` (B, G) float32 expression of
the model's genes, ``coords`` (B, D) standardised coordinates and ``index`` (B,) int64 cell ids).
Nothing else of it is read: :func:`dpvae.pipeline.build_model` takes :attr:`preprocessor`,
:class:`dpvae.callbacks.SpatialValidation` and :func:`dpvae.placement.embed_reference` take
:meth:`cells`. ``tests/test_contracts.py`` checks :class:`dpvae.datamodules.ReferenceDataModule`
against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from dpvae.preprocess import Preprocessor

Split = Literal["train", "val", "all"]


@dataclass(frozen=True)
class Cells:
    """A set of reference cells.

    Attributes:
        raw: (n, G) raw expression of the model's genes (a CSR matrix or array; row blocks of it
            are read with slicing).
        coords: (n, D) coordinates in the reference's original units.
        index: (n,) cell ids: row numbers in the reference's cell order (``cells("all")``).
        names: (n,) cell names.
        section: (n,) the name of each cell's section (a reference of several sections keeps
            each cell's; coordinates of different sections are in unrelated frames), or ``None``
            for a one-section reference.
        sections: every section's name, in the reference's order (the first is the default
            frame prediction imputes into); empty for a one-section reference.
    """

    raw: Any
    coords: np.ndarray
    index: np.ndarray
    names: np.ndarray
    section: np.ndarray | None = None
    sections: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.index)


@runtime_checkable
class ReferenceData(Protocol):
    """The reference a model trains on, after hygiene, gene selection and the split."""

    @property
    def preprocessor(self) -> Preprocessor:
        """Everything a model repeats at prediction time, fitted on the training cells
        (:func:`dpvae.preprocess.fit_preprocessor`), principal-component loadings included."""
        ...

    def cells(self, split: Split) -> Cells:
        """The training cells, the held-out validation cells, or all of them in cell order."""
        ...
