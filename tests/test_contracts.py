"""The datamodule contract (dpvae.contracts.ReferenceData): what the pipeline and callbacks read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpvae.config import load_config
from dpvae.contracts import Cells, ReferenceData
from dpvae.datamodules import ReferenceDataModule
from dpvae.errors import ConfigError
from dpvae.pipeline import build_datamodule


def test_the_reference_datamodule_keeps_the_contract(osmfish_small: Path) -> None:
    dm = ReferenceDataModule(osmfish_small, val_fraction=0.2, n_pcs=5)
    dm.setup()
    assert isinstance(dm, ReferenceData)
    every, train, val = dm.cells("all"), dm.cells("train"), dm.cells("val")
    assert all(isinstance(c, Cells) for c in (every, train, val))
    # the splits partition the cells; ids are row numbers of cells("all")
    assert sorted([*train.index, *val.index]) == list(range(len(every)))
    np.testing.assert_array_equal(every.coords[val.index], val.coords)
    np.testing.assert_array_equal(every.names[train.index], train.names)
    assert (every.raw[val.index] != val.raw[:]).nnz == 0
    pre = dm.preprocessor  # fitted, with its loadings
    assert every.raw.shape[1] == len(pre.genes)
    assert pre.pca_components is not None and pre.pca_components.shape == (len(pre.genes), 5)


class NotAReference:
    """A datamodule without the contract's methods."""

    def __init__(self, **kwargs: object) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        pass


def test_a_datamodule_without_the_contract_is_refused() -> None:
    cfg = load_config([f"data={Path(__file__).with_name('not_a_reference.yaml')}"])
    with pytest.raises(ConfigError, match="does not implement dpvae.contracts.ReferenceData"):
        build_datamodule(cfg)
