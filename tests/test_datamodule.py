"""The reference datamodule: hygiene, gene selection, coordinates, paired and sharded batches."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist

from dpvae.datamodules import PairedBatchSampler, ReferenceDataModule


def _toy(tmp_path: Path, dim: int = 2) -> Path:
    rng = np.random.default_rng(1)
    n, g = 300, 40
    x = rng.poisson(rng.gamma(0.5, 2.0, size=(n, g))).astype(np.float32)
    x[:, 0] += rng.poisson(50, size=n)  # make sure every cell has counts
    x[:, 5] = np.where(np.arange(n) % 2, rng.poisson(200, size=n), 0)  # the most variable gene
    x[7] = 0  # an empty cell
    a = ad.AnnData(X=sp.csr_matrix(x))
    a.var_names = [f"Blank-{i}" if i in (1, 2) else f"g{i}" for i in range(g)]
    a.obs_names = [f"c{i}" for i in range(n)]
    coords = rng.uniform(size=(n, dim)) * np.array([100.0, 10.0, 5.0][:dim])  # anisotropic
    a.obsm["spatial"] = coords
    path = tmp_path / f"toy{dim}.h5ad"
    a.write_h5ad(path)
    return path


def test_hygiene_gene_selection_and_single_scale(tmp_path: Path) -> None:
    dm = ReferenceDataModule(_toy(tmp_path), n_genes=10, val_fraction=0.2, seed=3)
    dm.setup()
    pre = dm.preprocessor
    cells = dm.cells("all")
    assert "c7" not in set(cells.names) and len(cells.names) == 299
    assert "the reference: 1 of 300 cells left out (no expression of the 38 genes)" in dm.notes
    assert not any(g.startswith("Blank") for g in pre.genes) and len(pre.genes) == 10
    assert "g5" in pre.genes  # the planted variable gene is selected
    assert pre.count_data and pre.normalize and pre.log1p
    # one scale for all axes: standardised distances are the original ones divided by one number
    std = pre.coords_to_model(cells.coords)
    ratio = pdist(std) / pdist(cells.coords)
    assert np.allclose(ratio, 1.0 / pre.coord_scale, rtol=1e-4)
    np.testing.assert_allclose(pre.coords_from_model(std), cells.coords, rtol=1e-4, atol=1e-3)
    # seeded, disjoint validation split of the requested size
    val, train = dm.cells("val").index, dm.cells("train").index
    assert len(val) == 60 and not set(val) & set(train) and len(val) + len(train) == 299
    dm2 = ReferenceDataModule(_toy(tmp_path), n_genes=10, val_fraction=0.2, seed=3)
    dm2.setup()
    np.testing.assert_array_equal(val, dm2.cells("val").index)


def test_backed_mode_gives_the_same_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dpvae.datamodules import reference

    opened: list[str] = []
    real, real_disk = reference.read_h5ad, reference.open_on_disk

    def spy(*args: object, **kwargs: object) -> ad.AnnData:
        adata = real(*args, **kwargs)  # type: ignore[arg-type]
        opened.append("backed" if adata.isbacked else "memory")
        return adata

    def spy_disk(*args: object) -> object:
        opened.append("on disk")
        return real_disk(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(reference, "read_h5ad", spy)
    monkeypatch.setattr(reference, "open_on_disk", spy_disk)
    path = _toy(tmp_path, dim=3)
    mem = ReferenceDataModule(path, n_genes=12, backed=False, chunk_size=64)
    disk = ReferenceDataModule(path, n_genes=12, backed=True, chunk_size=64)
    mem.setup()
    disk.setup()
    assert opened == ["memory", "on disk"]  # each mode took effect
    assert mem.preprocessor == disk.preprocessor
    assert not sp.issparse(disk.cells("all").raw)  # streamed: no matrix held
    assert (mem.cells("all").raw != disk.cells("all").raw[:]).nnz == 0
    assert mem.preprocessor.spatial_dim == 3


def test_batches_carry_coordinates_and_neighbour_pairs(tmp_path: Path) -> None:
    dm = ReferenceDataModule(_toy(tmp_path), n_genes=0, batch_size=32, n_neighbours=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["raw"].shape == (32, dm.n_genes) and batch["coords"].shape == (32, 2)
    # every anchor (even position) is followed by one of its 4 nearest spatial neighbours
    train = dm.cells("train")
    coords = dm.preprocessor.coords_to_model(train.coords)
    tree = cKDTree(coords)
    local = {int(v): i for i, v in enumerate(train.index)}
    rows = [local[int(i)] for i in batch["index"]]
    for a, b in zip(rows[0::2], rows[1::2]):
        _, nbrs = tree.query(coords[a], k=5)
        assert b in set(nbrs[1:].tolist())


def test_sampler_shards_are_disjoint_and_equal() -> None:
    n, nbrs = 103, np.zeros((103, 1), dtype=int)
    shards = [list(PairedBatchSampler(n, None, 10, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    cells = [sorted(i for b in s for i in b.rows.tolist()) for s in shards]
    assert not set(cells[0]) & set(cells[1]) and len(cells[0]) == len(cells[1]) == 51
    sampler = PairedBatchSampler(n, nbrs, 10, seed=0)
    first = [b.rows.tolist() for b in sampler]
    sampler.set_epoch(1)
    assert [b.rows.tolist() for b in sampler] != first  # a new order every epoch


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_bad_val_fraction(bad: float) -> None:
    from dpvae.errors import ConfigError

    with pytest.raises(ConfigError, match="val_fraction"):
        ReferenceDataModule(val_fraction=bad)


def test_neighbour_pcs_are_log_normalised_and_capped_by_reference_size(tmp_path: Path) -> None:
    """Prediction's expression PCs: loadings of the unscaled log-normalised training cells, at most
    one component per CELLS_PER_NEIGHBOUR_PC training cells."""
    from dpvae.preprocess import CELLS_PER_NEIGHBOUR_PC

    dm = ReferenceDataModule(_toy(tmp_path), n_genes=30, neighbour_pcs=15, val_fraction=0.1)
    dm.setup()
    train = dm.cells("train")
    n_train = len(train)  # 269 cells: 6 components, not 15
    assert dm.preprocessor.neighbour_pcs == n_train // CELLS_PER_NEIGHBOUR_PC == 6
    loadings = dm.preprocessor.neighbour_components
    assert loadings.shape == (30, 6) and dm.preprocessor.pca_components is None
    x = train.raw[:].toarray().astype(np.float64)
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)  # no per-gene scaling
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    top = vecs[:, np.argsort(vals)[::-1][:6]]
    # the same directions (up to sign): |cosine| of matching columns is 1
    np.testing.assert_allclose(np.abs((top * loadings).sum(axis=0)), 1.0, atol=1e-6)
    off = ReferenceDataModule(_toy(tmp_path), n_genes=30, neighbour_pcs=0)
    off.setup()
    assert off.preprocessor.neighbour_pcs == 0 and off.preprocessor.neighbour_components is None


def test_neighbour_component_rule() -> None:
    """15 leading components of a transcriptome-wide panel, every component of a targeted panel,
    and never more than one per CELLS_PER_NEIGHBOUR_PC training cells."""
    from dpvae.preprocess import neighbour_components

    assert neighbour_components(15, 2000, 100_000) == 15
    assert neighbour_components(15, 28, 100_000) == 28
    assert neighbour_components(15, 2000, 180) == 4
    assert neighbour_components(0, 28, 10_000) == 0


@pytest.mark.parametrize("n_cells", [40, 400])  # fewer cells than genes (Gram path), and more
def test_principal_components_match_numpy(n_cells: int) -> None:
    from dpvae.preprocess import ExpressionTransform, principal_components

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n_cells, 3)) @ rng.normal(size=(3, 120)) * 3  # three strong axes
    x = sp.csr_matrix(rng.poisson(np.exp(1 + latent / 10)).astype(np.float32))
    loadings = principal_components(x, ExpressionTransform(True, True), 5, chunk_size=64)
    y = np.log1p(x.toarray() / x.toarray().sum(axis=1, keepdims=True) * 1e4)
    vals, vecs = np.linalg.eigh(np.cov(y, rowvar=False, bias=True))
    top = vecs[:, np.argsort(vals)[::-1][:5]]
    assert loadings.shape == (120, 5)
    np.testing.assert_allclose(np.abs((top * loadings).sum(axis=0)), 1.0, atol=1e-5)


# --------------------------------------------------------------------- the pair sets
@pytest.mark.parametrize("far_pairs", [0, 50])
def test_pair_set_neighbour_and_far_pairs_with_their_weights(far_pairs: int) -> None:
    rng = np.random.default_rng(0)
    n, k = 103, 4
    nbrs = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    sampler = PairedBatchSampler(
        n, nbrs, 20, seed=1, pair_set=True, far_pairs=far_pairs, near_weight=0.3
    )
    plans = list(sampler)
    assert len(plans) == len(sampler) == 11
    for plan in plans:
        b = len(plan.rows)
        assert plan.pairs is not None and plan.weights is not None
        pairs, w = plan.pairs, plan.weights
        m = b // 2
        # the first m pairs are (anchor, its neighbour), weighing near_weight together
        assert pairs[:, :m].tolist() == [list(range(0, b, 2)), list(range(1, b, 2))]
        for a, c in pairs[:, :m].T:
            assert plan.rows[c] in set(nbrs[plan.rows[a]].tolist())
        assert w[:m].sum() == pytest.approx(0.3) and w.sum() == pytest.approx(1.0)
        far = pairs[:, m:]
        assert (far[0] < far[1]).all() and far.max() < b and far.dtype == np.int64
        if far_pairs:
            assert far.shape[1] == far_pairs
        else:  # every other in-batch pair, once
            assert far.shape[1] == b * (b - 1) // 2 - m
            assert len({tuple(p) for p in far.T} | {tuple(p) for p in pairs[:, :m].T}) == (
                b * (b - 1) // 2
            )
    again = list(PairedBatchSampler(n, nbrs, 20, seed=1, pair_set=True, far_pairs=far_pairs))
    assert all((p.pairs == q.pairs).all() for p, q in zip(plans, again))  # seeded


def test_two_ranks_shard_the_neighbour_pairs_disjointly() -> None:
    rng = np.random.default_rng(2)
    n, k = 101, 6
    nbrs = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    for epoch in (0, 1):
        near: list[set[tuple[int, int]]] = []
        anchors: list[list[int]] = []
        lengths = []
        for rank in (0, 1):
            sampler = PairedBatchSampler(
                n, nbrs, 16, seed=0, rank=rank, world_size=2, pair_set=True, far_pairs=0
            )
            sampler.set_epoch(epoch)
            plans = list(sampler)
            lengths.append(len(plans))
            mine = [
                (int(p.rows[a]), int(p.rows[c]))
                for p in plans
                for a, c in p.pairs[:, : len(p.rows) // 2].T
            ]
            near.append(set(mine))
            anchors.append([a for a, _ in mine])
            assert len(set(mine)) == len(mine) == n // 2  # each anchor once, with one neighbour
        assert lengths[0] == lengths[1]
        assert not near[0] & near[1]  # no (cell, neighbour) pair on both ranks
        assert not set(anchors[0]) & set(anchors[1])  # disjoint anchors, 50 each: 1 left out


def test_lightning_sets_the_epoch_of_the_batch_sampler() -> None:
    """Lightning calls set_epoch on dataloader.batch_sampler.sampler, not on the batch sampler:
    the sampler's hook must take it, or every epoch repeats the first one's batches."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    nbrs = np.tile(np.arange(1, 5), (40, 1)) % 40
    sampler = PairedBatchSampler(40, nbrs, 8, seed=0)
    loader = DataLoader(range(40), batch_sampler=sampler, collate_fn=lambda b: b)
    first = [p.rows.tolist() for p in sampler]
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3 and [p.rows.tolist() for p in sampler] != first


def test_training_batches_carry_the_pair_set_and_validation_all_pairs(tmp_path: Path) -> None:
    from dpvae.errors import ConfigError

    dm = ReferenceDataModule(
        _toy(tmp_path), n_genes=0, batch_size=32, pair_set=True, far_pairs=100, near_weight=0.4
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pairs"].shape == (2, 116) and batch["pairs"].dtype == torch.int64
    assert batch["pair_weight"].shape == (116,) and float(batch["pair_weight"][:16].sum()) == (
        pytest.approx(0.4)
    )
    assert "pairs" not in next(iter(dm.val_dataloader()))  # validation scores every pair
    off = ReferenceDataModule(_toy(tmp_path), n_genes=0, batch_size=32)
    off.setup()
    assert "pairs" not in next(iter(off.train_dataloader()))  # the default: every in-batch pair
    for bad in ({"near_weight": 1.0}, {"near_weight": 0.0}, {"far_pairs": -1}):
        with pytest.raises(ConfigError, match="near_weight|far_pairs"):
            ReferenceDataModule(**bad)  # type: ignore[arg-type]


def test_all_cells_are_views_and_the_fingerprint_is_the_joined_names_digest() -> None:
    """cells("all") copies nothing per cell (a million-cell reference holds it once), and the
    run fingerprint, hashed a block of names at a time, is the digest of all names joined (runs
    written before keep resuming)."""
    import hashlib
    import json

    from dpvae.run_folder import fingerprint

    dm = ReferenceDataModule(reference="osmfish")
    dm.setup("fit")
    cells = dm.cells("all")
    assert np.shares_memory(cells.coords, dm.cells("all").coords)
    assert np.shares_memory(cells.names, dm.cells("all").names)
    assert len(cells) == len(dm.cells("train")) + len(dm.cells("val"))
    h = hashlib.sha1()
    h.update(json.dumps(dm.preprocessor.to_dict(), sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(cells.coords, dtype=np.float64).tobytes())
    h.update("\0".join(map(str, cells.names)).encode())
    assert fingerprint(dm) == h.hexdigest()
    # across the block boundary: more names than one block
    import dpvae.run_folder as run_folder

    class Many:
        preprocessor = dm.preprocessor

        def cells(self, split: str) -> object:
            return type(cells)(
                raw=None,
                coords=np.zeros((70_000, 2)),
                index=np.arange(70_000),
                names=np.array([f"c{i}" for i in range(70_000)]),
            )

    many = Many().cells("all")
    h = hashlib.sha1()
    h.update(json.dumps(dm.preprocessor.to_dict(), sort_keys=True, default=str).encode())
    h.update(np.zeros((70_000, 2)).tobytes())
    h.update("\0".join(many.names).encode())  # type: ignore[attr-defined]
    assert run_folder.fingerprint(Many()) == h.hexdigest()


def test_streaming_reads_a_layer_from_disk_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """anndata's backed mode reads every layer into memory; a streamed reference whose counts
    are a layer keeps it on disk, reads no other, and gives the batches of the in-memory path."""
    import tracemalloc

    from dpvae.io import get_matrix, open_on_disk

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.5, size=(2000, 300)).astype(np.float32)
    counts[:, 0] += 1  # every cell expressed
    a = ad.AnnData(X=sp.csr_matrix(np.log1p(counts)))
    a.layers["counts"] = sp.csr_matrix(counts)
    a.layers["unused"] = rng.normal(size=counts.shape).astype(np.float32)  # 2.4 MB dense
    a.obsm["spatial"] = rng.uniform(0, 100, size=(2000, 2))
    path = tmp_path / "layers.h5ad"
    a.write_h5ad(path)
    tracemalloc.start()
    opened = open_on_disk(path)
    matrix = get_matrix(opened, "counts")
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < 0.5 * 2**20 and not sp.issparse(matrix)  # names only; the layer on disk
    assert opened.n_obs == 2000 and list(opened.var_names) == list(a.var_names)
    assert (sp.csr_matrix(matrix[10:20]) != a.layers["counts"][10:20]).nnz == 0
    opened.file.close()
    batches = []
    for backed in (False, True):
        dm = ReferenceDataModule(path, layer="counts", n_genes=50, backed=backed, num_workers=0)
        if backed:  # neither the file check before fit nor the setup goes through anndata
            import dpvae.datamodules.reference as reference

            def no_anndata(*args: object, **kwargs: object) -> None:
                raise AssertionError("read with anndata, which loads every layer")

            monkeypatch.setattr(reference, "read_h5ad", no_anndata)
        dm.prepare_data()
        dm.setup()
        assert dm.streaming == backed and dm.preprocessor.count_data
        batches.append(next(iter(dm.train_dataloader())))
    assert torch.equal(batches[0]["raw"], batches[1]["raw"])


def test_a_repeated_gene_name_is_read_as_two_genes(tmp_path: Path) -> None:
    """A name that repeats stood for its last column twice (the first one lost); each column is
    now its own gene, named as AnnData.var_names_make_unique names it, with a warning, and a
    query with the same columns is matched column for column."""
    from dpvae.errors import DPVAEWarning
    from dpvae.io import align_genes

    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(200, 6)).astype(np.float32)
    x[:, 0] += 100  # the first "A": high
    a = ad.AnnData(X=sp.csr_matrix(x))
    a.var_names = ["A", "B", "C", "A", "D", "E"]
    a.obsm["spatial"] = rng.uniform(0, 10, size=(200, 2))
    path = tmp_path / "repeat.h5ad"
    a.write_h5ad(path)
    dm = ReferenceDataModule(path, n_genes=0, val_fraction=0.1)
    with pytest.warns(DPVAEWarning, match="1 gene names of the reference repeat"):
        dm.setup()
    genes = list(dm.preprocessor.genes)
    assert sorted(genes) == ["A", "A-1", "B", "C", "D", "E"]
    raw = dm.cells("all").raw.toarray()
    cells = dm.cells("all").index
    np.testing.assert_array_equal(raw[:, genes.index("A")], x[cells, 0])
    np.testing.assert_array_equal(raw[:, genes.index("A-1")], x[cells, 3])
    with pytest.warns(DPVAEWarning, match="repeat"):
        matrix, missing = align_genes(a, genes)
    assert missing == 0
    np.testing.assert_array_equal(matrix.toarray()[:, genes.index("A")], x[:, 0])


def test_a_cell_is_never_its_own_spatial_neighbour() -> None:
    """Cells at one position tie at distance 0, and the tree may list a twin before the cell
    itself: the cell is dropped wherever it sits among its k + 1 nearest."""
    from dpvae.datamodules.reference import _spatial_neighbours

    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10, size=(400, 2))
    coords[200:300] = coords[100:200]  # 100 cells repeat another's position
    coords[300:303] = coords[0]  # four cells at one position
    section = np.zeros(400, dtype=np.int64)
    nbrs = _spatial_neighbours(coords, section, 3)
    assert nbrs.shape == (400, 3)
    assert not (nbrs == np.arange(400)[:, None]).any()
    assert all(len(set(row)) == 3 for row in nbrs.tolist())
    assert 100 in nbrs[200].tolist() and 200 in nbrs[100].tolist()  # twins pair
    assert set(nbrs[0].tolist()) == {300, 301, 302}  # the three others at its position
    # the embedded osmFISH has 527 repeated positions: none pairs a cell with itself
    dm = ReferenceDataModule("osmfish", n_genes=0)
    dm.setup()
    own = dm.train_neighbours == np.arange(len(dm.train_neighbours))[:, None]
    assert not own.any()


def test_each_section_keeps_two_training_cells_and_validation_is_not_rounded_away(
    tmp_path: Path,
) -> None:
    from dpvae.errors import DataError

    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate((40, 40, 40, 40)):
        a = ad.AnnData(X=sp.csr_matrix(rng.poisson(3.0, size=(n, 20)).astype(np.float32) + 1))
        a.var_names = [f"g{j}" for j in range(20)]
        a.obsm["spatial"] = rng.uniform(0, 10, size=(n, 2))
        paths.append(tmp_path / f"s{i}.h5ad")
        a.write_h5ad(paths[-1])
    # 1.2% of 160 cells is 2, but of each section of 40 it rounds to none
    dm = ReferenceDataModule([str(p) for p in paths], n_genes=0, val_fraction=0.012)
    with pytest.raises(DataError, match="too few to hold out"):
        dm.setup()
    small = tmp_path / "small.h5ad"
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(3.0, size=(3, 20)).astype(np.float32) + 1))
    a.var_names = [f"g{j}" for j in range(20)]
    a.obsm["spatial"] = rng.uniform(0, 10, size=(3, 2))
    a.write_h5ad(small)
    dm = ReferenceDataModule([str(paths[0]), str(small)], n_genes=0, val_fraction=0.5, min_cells=3)
    with pytest.raises(DataError, match="section small keeps 1 of its 3 usable cells"):
        dm.setup()


def test_stored_rows_take_a_boolean_mask_as_a_matrix_does(tmp_path: Path) -> None:
    dm = ReferenceDataModule(_toy(tmp_path), n_genes=0, backed=True)
    dm.setup()
    stored = dm.cells("all").raw
    mask = np.zeros(len(stored), dtype=bool)
    mask[[3, 50, 51]] = True
    np.testing.assert_array_equal(stored[mask].toarray(), stored[np.array([3, 50, 51])].toarray())
    with pytest.raises(IndexError):
        stored[mask[:-1]]
