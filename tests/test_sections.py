"""A reference of several sections, and streaming batches from disk instead of memory."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dpvae.cli import train_main
from dpvae.datamodules import ReferenceDataModule
from dpvae.datamodules.sources import StoredRows
from dpvae.preprocess import gene_moments


def _rotate(coords: np.ndarray, angle: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return coords @ np.array([[c, -s], [s, c]]).T + np.asarray(shift)


@pytest.fixture(scope="module")
def two_sections(osmfish: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """osmFISH cut in two halves (left, right), written as two sections in unrelated frames.

    The halves share cell names (both renumbered 0..n-1); the second is rotated and shifted far
    away, has one extra gene and a ``Blank`` control, and lacks one of the first's genes.
    """
    tmp = tmp_path_factory.mktemp("sections")
    x = osmfish.obsm["spatial"][:, 0]
    left = osmfish[x < np.median(x)].copy()
    right = osmfish[x >= np.median(x)].copy()
    for part in (left, right):
        part.obs_names = [f"cell{i}" for i in range(part.n_obs)]
    right.obsm["spatial"] = _rotate(right.obsm["spatial"], 0.7, (5e4, -3e4))
    rng = np.random.default_rng(0)
    extra = rng.poisson(1.0, size=(right.n_obs, 2)).astype(np.float32)
    right = ad.concat(
        [
            right[:, 1:],  # drops the first gene
            ad.AnnData(sp.csr_matrix(extra), obs=right.obs[[]]),
        ],
        axis=1,
        merge="first",
    )
    right.var_names = [*osmfish.var_names[1:], "extra_gene", "Blank-1"]
    right.obsm["spatial"] = _rotate(osmfish[x >= np.median(x)].obsm["spatial"], 0.7, (5e4, -3e4))
    paths = [tmp / "left.h5ad", tmp / "right.h5ad"]
    left.X = sp.csr_matrix(left.X)
    right.X = sp.csr_matrix(right.X)
    left.write_h5ad(paths[0])
    right.write_h5ad(paths[1])
    return paths


def _dm(reference: object, **kwargs: object) -> ReferenceDataModule:
    dm = ReferenceDataModule(reference, n_genes=0, **kwargs)  # type: ignore[arg-type]
    with pytest.warns(Warning, match="cell names repeat across sections"):
        dm.setup()
    return dm


def test_sections_share_genes_keep_their_frames_and_never_pair_across(
    two_sections: list[Path], osmfish: ad.AnnData
) -> None:
    dm = _dm([str(p) for p in two_sections], batch_size=64)
    pre = dm.preprocessor
    # the genes both sections have, in the first's order; the count is stated
    assert pre.genes == [str(g) for g in osmfish.var_names[1:]]
    assert dm.notes[0].startswith(f"2 sections (left, right): {len(pre.genes)} genes shared")
    every = dm.cells("all")
    assert every.sections == ("left", "right")
    # repeated names made unique with the section's name
    assert len(set(every.names)) == len(every) and every.names[0] == "left:cell0"
    # validation cells held out in every section, in proportion
    val = dm.cells("val")
    for name in ("left", "right"):
        n = int((every.section == name).sum())
        assert int((val.section == name).sum()) == round(0.1 * n)
    # each section centred on its own training cells, one scale for both
    train = dm.cells("train")
    for name in ("left", "right"):
        mine = train.section == name
        std = pre.coords_to_model(train.coords[mine], name)
        np.testing.assert_allclose(std.mean(axis=0), 0.0, atol=1e-9)
    centred = np.concatenate(
        [
            pre.coords_to_model(train.coords[train.section == s], s) * pre.coord_scale
            for s in ("left", "right")
        ]
    )
    assert pre.coord_scale == pytest.approx(float(np.sqrt(np.mean(centred**2))))
    # gene statistics over the training cells of both sections
    mean, _ = gene_moments(train.raw[:], pre.normalize, pre.log1p)
    np.testing.assert_allclose(pre.gene_mean, mean, rtol=1e-9)
    # spatial partners are in the anchor's own section
    code = np.repeat([0, 1], [int((train.section == s).sum()) for s in ("left", "right")])
    assert dm.train_neighbours is not None
    assert (code[dm.train_neighbours] == code[:, None]).all()


def test_the_model_scores_no_pair_across_sections(two_sections: list[Path]) -> None:
    from dpvae.pipeline import build_model

    dm = _dm([str(p) for p in two_sections], batch_size=64)
    from omegaconf import OmegaConf

    from dpvae.config import load_config

    cfg = load_config(["model.warmup_epochs=0"])
    model = build_model(cfg, dm)
    seen = []
    forward = model.regularizer.forward

    def spy(z: torch.Tensor, coords: torch.Tensor, pairs: torch.Tensor, **kw: object) -> object:
        seen.append(pairs)
        return forward(z, coords, pairs, **kw)

    model.regularizer.forward = spy  # type: ignore[method-assign]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["section"].tolist()) == {0, 1}  # a batch mixes sections
    model.train()
    model._losses(batch)
    section = batch["section"]
    assert seen and (section[seen[0][0]] == section[seen[0][1]]).all()
    assert OmegaConf.is_config(cfg)


def test_training_on_two_sections_from_the_command_line(
    two_sections: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = train_main(
        [
            f"data.reference=[{two_sections[0]},{two_sections[1]}]",
            f"run_dir={run}",
            "logger=none",
            "trainer.max_epochs=2",
            "model.warmup_epochs=1",
            "trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert re.search(r"dpvae: 2 sections \(left, right\): \d+ genes shared by all", err)
    emb = ad.read_h5ad(run / "embedding.h5ad")
    assert list(emb.obs["section"].cat.categories) == ["left", "right"]
    assert emb.obs_names[0] == "left:cell0"
    # a folder of sections is the same reference
    folder_run = tmp_path / "folder"
    assert (
        train_main(
            [
                f"data.reference={two_sections[0].parent}",
                f"run_dir={folder_run}",
                "logger=none",
                "trainer.max_epochs=1",
                "model.warmup_epochs=0",
                "trainer.enable_progress_bar=false",
                "embedding.write=false",
            ]
        )
        == 0
    )


def _write(tmp: Path, name: str, a: ad.AnnData) -> Path:
    path = tmp / name
    a.write_h5ad(path)
    return path


@pytest.mark.parametrize("case", ["missing", "no_shared_gene", "dimensions", "twice"])
def test_bad_section_lists_one_line_exit_2(
    case: str,
    two_sections: list[Path],
    osmfish: ad.AnnData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    left = str(two_sections[0])
    if case == "missing":
        items, message = [left, str(tmp_path / "nope.h5ad")], r"nope.h5ad: no such file \(item 2"
    elif case == "no_shared_gene":
        other = osmfish[:200].copy()
        other.var_names = [f"other{i}" for i in range(other.n_vars)]
        items = [left, str(_write(tmp_path, "other.h5ad", other))]
        message = "the sections share no gene"
    elif case == "dimensions":
        flat = osmfish[:200].copy()
        flat.obsm["spatial"] = np.c_[flat.obsm["spatial"], np.zeros(flat.n_obs)]
        items = [left, str(_write(tmp_path, "thick.h5ad", flat))]
        message = r"different coordinate dimensions: left \(2-D\), thick \(3-D\)"
    else:
        items, message = [left, left], "listed twice"
    run = tmp_path / "run"
    code = train_main([f"data.reference=[{','.join(items)}]", f"run_dir={run}", "logger=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dpvae: error: ")
    assert re.search(message, err[0]), err[0]
    assert not run.exists()


# ---------------------------------------------------------------- streaming from disk


def _fit_weights(path: Path, backed: str, tmp: Path) -> dict[str, np.ndarray]:
    import dpvae

    model = dpvae.fit(
        str(path),
        f"data.backed={backed}",
        "trainer.max_epochs=3",
        "model.warmup_epochs=1",
        "callbacks.spatial.every_n_epochs=1",
    )
    return {k: v.detach().numpy().copy() for k, v in model.module.state_dict().items()}


def test_streaming_trains_the_same_model_as_memory(osmfish_small: Path, tmp_path: Path) -> None:
    memory = _fit_weights(osmfish_small, "false", tmp_path)
    disk = _fit_weights(osmfish_small, "true", tmp_path)
    assert memory.keys() == disk.keys()
    for key in memory:
        np.testing.assert_array_equal(memory[key], disk[key], err_msg=key)


def test_streaming_holds_no_expression(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, g = 3000, 400
    x = sp.random(n, g, density=0.1, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    a = ad.AnnData(x)
    a.obsm["spatial"] = rng.uniform(size=(n, 2))
    path = _write(tmp_path, "big.h5ad", a)
    disk = ReferenceDataModule(str(path), n_genes=0, backed=True)
    disk.setup()
    mem = ReferenceDataModule(str(path), n_genes=0, backed=False)
    mem.setup()
    assert isinstance(disk.cells("all").raw, StoredRows)
    # what a DataLoader worker receives: per-cell bookkeeping only, no expression
    assert len(pickle.dumps(disk.train_set)) < x.data.nbytes / 2
    assert len(pickle.dumps(mem.train_set)) > x.data.nbytes
    rows = np.array([5, 2999, 0, 5, 1234])
    assert (disk.cells("all").raw[rows] != mem.cells("all").raw[rows]).nnz == 0
    batch_disk = next(iter(disk.train_dataloader()))
    batch_mem = next(iter(mem.train_dataloader()))
    for key in batch_mem:
        assert torch.equal(batch_disk[key], batch_mem[key]), key


def test_dense_matrices_stream_and_column_major_ones_are_refused(
    osmfish: ad.AnnData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense = osmfish[:400].copy()
    dense.X = np.asarray(dense.X.toarray() if sp.issparse(dense.X) else dense.X)
    path = _write(tmp_path, "dense.h5ad", dense)
    disk = ReferenceDataModule(str(path), n_genes=0, backed=True)
    disk.setup()
    mem = ReferenceDataModule(str(path), n_genes=0, backed=False)
    mem.setup()
    assert (disk.cells("train").raw[:] != mem.cells("train").raw[:]).nnz == 0
    csc = osmfish[:400].copy()
    csc.X = sp.csc_matrix(csc.X)
    csc_path = _write(tmp_path, "csc.h5ad", csc)
    auto = ReferenceDataModule(str(csc_path), n_genes=0, backed_threshold_mb=0.0)
    auto.setup()  # large by the threshold, but column-major: held in memory instead
    assert not auto.streaming
    code = train_main(
        [f"data.reference={csc_path}", "data.backed=true", f"run_dir={tmp_path / 'r'}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "stored by columns" in err[0]


def test_sections_of_one_file_name_get_names_no_other_section_has(tmp_path: Path) -> None:
    """d1/a, d2/a and d1/a-1: the second a is a-2, not a second a-1 (whose centre would be
    taken for both)."""
    from dpvae.paths import resolve_references

    for sub, name in (("d1", "a"), ("d2", "a"), ("d1", "a-1")):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / f"{name}.h5ad").write_bytes(b"")
    found = resolve_references(
        [
            str(tmp_path / "d1" / "a.h5ad"),
            str(tmp_path / "d2" / "a.h5ad"),
            str(tmp_path / "d1" / "a-1.h5ad"),
        ]
    )
    assert [name for name, _ in found] == ["a", "a-2", "a-1"]
