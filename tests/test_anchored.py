"""The benchmark's anchored task: the split, its median_error denominator, radius scores, runs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

import dpvae
from benchmarks import protocol as B
from dpvae.data import embedded_path
from dpvae.errors import ConfigError
from dpvae.metrics import median_nn_distance

FAKE = "tests.test_anchored:fake_radius_method"


def _grid_section(nx: int, ny: int, spacing: float, name: str) -> ad.AnnData:
    """A toy section on a grid whose expression encodes position: gx = x + 1, gy = y + 1."""
    x, y = np.meshgrid(np.arange(nx) * spacing, np.arange(ny) * spacing, indexing="ij")
    xy = np.c_[x.ravel(), y.ravel()]
    X = np.c_[xy[:, 0] + 1.0, xy[:, 1] + 1.0, np.ones(len(xy))]
    a = ad.AnnData(
        X=sp.csr_matrix(X.astype(np.float32)),
        obs=pd.DataFrame(index=[f"{name}{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=["gx", "gy", "other"]),
    )
    a.obsm["spatial"] = xy
    return a


def _offsets(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fake method's error (along x) and radius per cell, from the true position."""
    err = 0.5 + 0.01 * np.round(16 * T[:, 0] + T[:, 1])  # one value per cell, no ties
    scale = np.where(np.round(T[:, 1]) % 2 == 0, 1.1, 0.9)  # half the cells covered
    return err, err * scale


def fake_radius_method(
    ref: ad.AnnData, query: ad.AnnData, task: str, seed: int, ctx: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Reads the position out of the expression, moves it by a known error, reports a radius."""
    assert task == "anchored" and "spatial" not in query.obsm and ctx["source"] is None

    def grid(a: ad.AnnData) -> np.ndarray:
        X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        return np.c_[X[:, :2].astype(np.float64) - 1.0, np.ones(a.n_obs)]

    # the map from the expression's grid to the anchors' frame, learned on the anchors
    M = np.linalg.lstsq(grid(ref), np.asarray(ref.obsm["spatial"]), rcond=None)[0]
    G = grid(query)
    err, radius = _offsets(G[:, :2])
    return G @ M + np.c_[err, np.zeros_like(err)], radius


# ----------------------------------------------------------------------------------------------
# the split and the configuration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "seed"), [(251, 0.05, 0), (251, 0.1, 2), (3673, 0.05, 1)]
)
def test_anchored_split_is_the_protocols(n: int, fraction: float, seed: int) -> None:
    anchors, query = B.anchored_split(n, fraction, seed)
    perm = np.random.default_rng(seed).permutation(n)
    n_anchor = round(fraction * n)
    np.testing.assert_array_equal(anchors, np.sort(perm[:n_anchor]))
    np.testing.assert_array_equal(query, np.sort(perm[n_anchor:]))
    assert len(np.intersect1d(anchors, query)) == 0 and len(np.union1d(anchors, query)) == n
    if (n, fraction) == (251, 0.05):
        assert len(anchors) == 13  # breast layer 2: the fewest anchors a method must cope with


def test_anchored_units_fractions_and_overrides(tmp_path: Path) -> None:
    for fname in ("dlpfc_visium_151673.h5ad", "dlpfc_visium_151674.h5ad"):
        (tmp_path / fname).touch()
    cfg = B.parse_args(
        [
            f"data_dir={tmp_path}",
            "tasks=anchored",
            "finetune_overrides=trainer.max_epochs=80 'callbacks.freeze.modules=[decoder]'",
        ]
    )
    assert cfg.impute_units == () and cfg.transfer_units == ()
    assert cfg.anchored_units == (
        ("dlpfc_151673", "dlpfc_151674", 0.05),
        ("dlpfc_151673", "dlpfc_151674", 0.1),
    )
    names = [B._unit_name(u) for u in cfg.anchored_units]
    assert names == ["dlpfc_151673->dlpfc_151674@5%", "dlpfc_151673->dlpfc_151674@10%"]
    assert cfg.finetune_overrides == ("trainer.max_epochs=80", "callbacks.freeze.modules=[decoder]")
    assert cfg.cache_dir == cfg.out / "cache"
    cfg = B.parse_args([f"data_dir={tmp_path}", "tasks=anchored", "anchor_fractions=0.2"])
    assert [B._unit_name(u) for u in cfg.anchored_units] == ["dlpfc_151673->dlpfc_151674@20%"]
    for args, needle in (
        (["anchor_fractions=0"], "between 0 and 1"),
        (["anchor_fractions=1.5"], "between 0 and 1"),
        (["finetune_overrides=max_epochs"], "key=value"),
    ):
        with pytest.raises(ConfigError, match=needle):
            B.parse_args([f"data_dir={tmp_path}", "tasks=anchored", *args])


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


def test_anchored_median_error_is_in_the_whole_sections_cell_spacing() -> None:
    section = _grid_section(20, 20, 2.0, "b")  # cell spacing 2
    anchors, query = B.anchored_split(section.n_obs, 0.05, 0)
    T = section.obsm["spatial"][query]
    P = T + np.array([3.0, 4.0])  # every cell 5 units off: 2.5 cell spacings
    all_b = section.obsm["spatial"]
    scores = B._score("knn_regression", "anchored", P, T, all_b)
    assert scores["median_error"] == pytest.approx(2.5)
    assert "procrustes_rmse" not in scores and scores["dist_pearson"] == pytest.approx(1.0)
    # the anchors' own spacing (what impute would use) is much wider and gives another number
    sparse = median_nn_distance(all_b[anchors])
    assert sparse > 3.0
    assert B._score("knn_regression", "impute", P, T, all_b[anchors])["median_error"] < 2.0


def test_radius_scores_count_covered_cells_and_rank_radii() -> None:
    T = np.zeros((4, 2))
    P = np.array([[1.0, 0], [0, 2.0], [3.0, 0], [0, 4.0]])  # errors 1, 2, 3, 4
    out = B.radius_scores(P, T, np.array([1.0, 1.5, 3.5, 5.0]))  # covers cells 0, 2, 3
    assert out["coverage90"] == pytest.approx(0.75)
    assert out["radius_spearman"] == pytest.approx(1.0)
    out = B.radius_scores(P, T, np.array([4.0, 3.0, 2.0, 1.0]))
    assert out["coverage90"] == pytest.approx(0.5) and out["radius_spearman"] == pytest.approx(-1)
    assert np.isnan(B.radius_scores(P, T, np.full(4, 2.0))["radius_spearman"])  # constant radius
    # a NaN radius claims nothing: not covered, left out of the correlation
    out = B.radius_scores(P, T, np.array([1.0, np.nan, 3.5, 5.0]))
    assert out["coverage90"] == pytest.approx(0.75) and out["radius_spearman"] == pytest.approx(1)
    out = B.radius_scores(P, T, np.array([np.nan, 1.5, 2.0, 3.0]))
    assert out["coverage90"] == pytest.approx(0.0) and out["radius_spearman"] == pytest.approx(1)
    bad_radii = (np.ones(3), np.full(4, np.nan), np.array([1.0, np.inf, 1, 1]), -np.ones(4))
    for bad in bad_radii:
        with pytest.raises(ValueError, match="radius"):
            B.radius_scores(P, T, bad)
    # radius scores for impute and anchored only, never for a frame-free method
    rng = np.random.default_rng(0)
    T = rng.normal(size=(20, 2))
    P, r = T + rng.normal(scale=0.1, size=(20, 2)), np.ones(20)
    assert B._score("knn_regression", "impute", P, T, T, r)["coverage90"] == 1.0
    assert B._score("knn_regression", "anchored", P, T, T, r)["coverage90"] == 1.0
    assert "coverage90" not in B._score("knn_regression", "transfer", P, T, T, r)
    assert "coverage90" not in B._score("pca_mds", "anchored", P, T, T, r)
    assert "coverage90" not in B._score("knn_regression", "anchored", P, T, T)


def test_a_method_returns_coordinates_or_coordinates_and_radius() -> None:
    xy = np.arange(6.0).reshape(3, 2)
    coords, radius = B._split_output(xy)
    assert radius is None and coords.shape == (3, 2)
    coords, radius = B._split_output((xy, [1, 2, 3]))
    np.testing.assert_array_equal(radius, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one per cell"):
        B._split_output((xy, np.ones(2)))
    with pytest.raises(ValueError, match="coordinates or"):
        B._split_output((xy, np.ones(3), np.ones(3)))


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_anchored_run_scores_a_radius_method_against_section_b(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _grid_section(12, 10, 1.0, "a").write_h5ad(data / "toy_a.h5ad")
    b = _grid_section(16, 15, 1.0, "b")
    b.obsm["spatial"] = b.obsm["spatial"] * 3.0  # B's cell spacing is 3 (expression: the grid)
    b.write_h5ad(data / "toy_b.h5ad")
    out = tmp_path / "out"
    cfg = B.parse_args(
        [
            f"data_dir={data}",
            "tasks=anchored",
            "pairs=toy_a->toy_b",
            "anchor_fractions=0.1",
            "seeds=1",
            f"out={out}",
            "threads=1",
        ]
    )
    cfg.methods = (FAKE, "knn_regression")
    B.run_benchmark(cfg, log=lambda s: None)
    rows = _rows(out)
    assert [(r["unit"], r["method"], r["status"]) for r in rows] == [
        ("toy_a->toy_b@10%", FAKE, "ok"),
        ("toy_a->toy_b@10%", "knn_regression", "ok"),
    ]
    anchors, query = B.anchored_split(b.n_obs, 0.1, 1)
    assert int(rows[0]["n_ref"]) == len(anchors) == 24 and int(rows[0]["n_query"]) == len(query)
    # the fake errs by a known amount in B's frame: recompute its scores by hand
    T = b.obsm["spatial"][query]
    err, radius = _offsets(T / 3.0)
    P = T + np.c_[err, np.zeros_like(err)]
    e = np.linalg.norm(P - T, axis=1)
    assert float(rows[0]["median_error"]) == pytest.approx(np.median(e) / 3.0, rel=1e-5)
    assert float(rows[0]["coverage90"]) == pytest.approx(np.mean(e <= radius), rel=1e-5)
    assert 0.3 < float(rows[0]["coverage90"]) < 0.7
    rho = spearmanr(radius, e).statistic
    assert float(rows[0]["radius_spearman"]) == pytest.approx(rho, rel=1e-5)
    assert rows[1]["coverage90"] == "" and float(rows[1]["median_error"]) > 0
    md = (out / "results.md").read_text()
    assert "| coverage90 | radius_spearman |" in md
    assert f"| anchored | toy_a->toy_b@10% | {FAKE} |" in md
    assert (out / "figures" / "anchored__toy_a__to__toy_b__10pct.png").is_file()
    saved = out / "predictions" / f"anchored__toy_a__to__toy_b__10pct__{FAKE}__seed1__radius.npy"
    np.testing.assert_allclose(np.load(saved), radius)


def test_anchored_only_methods_are_skipped_on_impute(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _grid_section(8, 8, 1.0, "a").write_h5ad(data / "toy_a.h5ad")
    out = tmp_path / "out"
    lines: list[str] = []
    cfg = B.parse_args(
        [
            f"data_dir={data}",
            "tasks=impute",
            "methods=dpvae_anchors,dpvae_zeroshot,dpvae_through,knn_regression",
            "seeds=0",
            f"out={out}",
            "threads=1",
        ]
    )
    B.run_benchmark(cfg, log=lines.append)
    assert [(r["task"], r["method"], r["status"]) for r in _rows(out)] == [
        ("impute", "knn_regression", "ok")
    ]
    assert any("only run on the anchored task" in line for line in lines)


@pytest.mark.slow  # four spawned training processes: about 3 minutes on 2 busy shared cores
def test_anchored_dpvae_variants_on_two_osmfish_halves(tmp_path: Path) -> None:
    """Fine-tuned, zero-shot, through-A and anchors-only dpvae (a few epochs) on osmFISH cut in
    two: every variant runs, the A model is trained once and reused with its seconds counted."""
    full = ad.read_h5ad(embedded_path("osmfish"))
    xy = full.obsm["spatial"]
    small = full[np.sort(np.argsort(np.linalg.norm(xy - xy.mean(0), axis=1))[:600])].copy()
    left = small.obsm["spatial"][:, 0] < np.median(small.obsm["spatial"][:, 0])
    data = tmp_path / "data"
    data.mkdir()
    small[left].copy().write_h5ad(data / "half_a.h5ad")
    small[~left].copy().write_h5ad(data / "half_b.h5ad")
    out = tmp_path / "out"
    code = B.work(
        B.compose(
            [
                f"data_dir={data}",
                "tasks=anchored",
                "pairs=half_a->half_b",
                "methods=dpvae_zeroshot,dpvae,dpvae_through,dpvae_anchors,knn_regression",
                "anchor_fractions=0.05",
                "seeds=0",
                f"out={out}",
                "threads=1",
                "dpvae_overrides=trainer.max_epochs=2 model.warmup_epochs=1",
                "finetune_overrides=trainer.max_epochs=2",
            ]
        )
    )
    assert code == 0
    rows = {(r["task"], r["method"]): r for r in _rows(out)}
    n_b = int((~left).sum())
    for method in ("dpvae_zeroshot", "dpvae", "dpvae_through", "dpvae_anchors", "knn_regression"):
        r = rows[("anchored", method)]
        assert r["status"] == "ok", r
        assert int(r["n_ref"]) == round(0.05 * n_b) == 15 and int(r["n_query"]) == n_b - 15
        assert np.isfinite(float(r["median_error"])) and -1 <= float(r["dist_pearson"]) <= 1
    # dpvae_zeroshot trained the A model (its own time), dpvae reused it and counts its seconds
    assert float(rows[("anchored", "dpvae_zeroshot")]["reused_s"]) == 0
    reused = float(rows[("anchored", "dpvae")]["reused_s"])
    assert reused > 0 and float(rows[("anchored", "dpvae")]["wall_s"]) > reused
    assert len(list((out / "cache").iterdir())) == 1
    if hasattr(dpvae.Model, "predict_with_radius"):  # dpvae's calibrated 90% radius is scored
        for method in ("dpvae_zeroshot", "dpvae", "dpvae_through"):
            assert 0 <= float(rows[("anchored", method)]["coverage90"]) <= 1
        # trained on every anchor, nothing held out: no radius (a training cell never calibrates)
        assert rows[("anchored", "dpvae_anchors")]["coverage90"] == ""
    assert (out / "figures" / "anchored__half_a__to__half_b__5pct.png").is_file()
    assert "## Anchored: fine-tuned dpvae against the others" in (out / "results.md").read_text()
