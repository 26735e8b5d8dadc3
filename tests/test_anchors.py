"""Placement through the reference into a new section's frame, carried there by anchor cells."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import dpvae
from dpvae.anchors import fit_motion
from dpvae.cli import predict_main
from dpvae.errors import ConfigError, DataError

#: a mirrored quarter turn and a shift: a section mounted another way in another frame
TURN = np.array([[0.0, 1.0], [1.0, 0.0]])
SHIFT = np.array([5000.0, -300.0])


def test_fit_motion_recovers_a_rotation_reflection_and_units() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(40, 2)) * 100
    angle = 0.7
    rot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) @ TURN
    same_units = src @ rot + SHIFT
    m = fit_motion(src, same_units + rng.normal(scale=1.0, size=src.shape))
    assert m.scale == 1.0 and np.allclose(m.rotation, rot, atol=0.02)
    assert np.abs(m(src) - same_units).max() < 5.0
    microns = 250.0 * src @ rot + SHIFT  # the anchors' frame in other units
    m = fit_motion(src, microns)
    assert m.scale == pytest.approx(250.0) and np.allclose(m(src), microns)
    # a noisy correspondence in the same units keeps its units (least squares would shrink it)
    noisy = src @ rot + rng.normal(scale=120.0, size=src.shape)
    assert fit_motion(src, noisy).scale == 1.0


def _moved_section(osmfish_run: dict[str, Path], n_anchors: int) -> tuple[ad.AnnData, ...]:
    """The held-out osmFISH cells as a new section: their positions mirrored, turned and
    shifted; ``n_anchors`` of them (keep their moved positions) and the rest (the query, its
    true moved positions kept for scoring); plus the query at the original positions."""
    section = ad.read_h5ad(osmfish_run["query"])
    section = section[np.asarray(section.X.sum(axis=1)).ravel() > 0].copy()
    original = section.copy()
    section.obsm["spatial"] = np.asarray(section.obsm["spatial"], dtype=np.float64) @ TURN + SHIFT
    pick = np.random.default_rng(1).permutation(section.n_obs)
    anchors = section[np.sort(pick[:n_anchors])].copy()
    rest = np.sort(pick[n_anchors:])
    return anchors, section[rest].copy(), original[rest].copy()


def test_the_query_is_placed_through_the_reference_into_the_anchors_frame(
    osmfish_run: dict[str, Path],
) -> None:
    """Through the run's reference, then carried by the motion fitted to 30 anchors: the query
    lands in the new frame about as well as plain impute places it in the old one (the same
    neighbours; the motion is recovered), its radius calibrated on the anchors."""
    model = dpvae.load(osmfish_run["run"])
    anchors, query, original = _moved_section(osmfish_run, 30)
    pred = model._predict(query, anchors=anchors)
    through = pred.info["anchors"]
    assert through["n_anchors"] == 30 and through["scale"] == 1.0 and through["folds"] == 5
    assert np.allclose(np.asarray(through["rotation"]), TURN, atol=0.15)
    plain = model._predict(original, align_query=True)
    err = np.linalg.norm(pred.coords - query.obsm["spatial"], axis=1)
    err_plain = np.linalg.norm(plain.coords - original.obsm["spatial"], axis=1)
    print("MEASURE median error through", np.median(err), "plain", np.median(err_plain))
    assert np.median(err) < 1.25 * np.median(err_plain)
    scores = pred.info["scores"]
    assert scores["dist_pearson"] > 0.45 and 0.6 < scores["coverage90"] <= 1.0
    assert np.isfinite(pred.radius).all() and pred.info["radius"]["n_calibration"] == 30
    # placing anchors at their own positions is no part of it: the query's cells only
    assert pred.coords.shape == (query.n_obs, 2)


def test_anchors_through_the_command_and_bad_anchors(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors, query, _ = _moved_section(osmfish_run, 20)
    anchors.write_h5ad(tmp_path / "anchors.h5ad")
    query.write_h5ad(tmp_path / "rest.h5ad")
    ckpt = osmfish_run["run"] / "model.ckpt"
    common = [f"checkpoint={ckpt}", f"query={tmp_path / 'rest.h5ad'}"]
    out = tmp_path / "placed.h5ad"
    assert predict_main([*common, f"output={out}", f"anchors={tmp_path / 'anchors.h5ad'}"]) == 0
    printed = capsys.readouterr().out
    assert "through the reference, 20 anchors" in printed
    placed = ad.read_h5ad(out)
    assert placed.uns["dpvae"]["anchors"]["n_anchors"] == 20
    assert np.isfinite(placed.obs["dpvae_radius90"]).all()
    # bad input: one line, exit 2, nothing written
    bare = anchors.copy()
    del bare.obsm["spatial"]
    bare.write_h5ad(tmp_path / "bare.h5ad")
    anchors[:2].copy().write_h5ad(tmp_path / "two.h5ad")
    one_place = anchors.copy()
    one_place.obsm["spatial"] = np.zeros_like(anchors.obsm["spatial"])
    one_place.write_h5ad(tmp_path / "one_place.h5ad")
    anchors[:0].copy().write_h5ad(tmp_path / "none.h5ad")
    renamed = anchors.copy()
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    cases = {
        "nope.h5ad": "no such file",
        "bare.h5ad": "; set spatial_key to the key that holds them",
        "two.h5ad": "at least 3 anchor cells",
        "one_place.h5ad": "the anchors all share one position",
        "none.h5ad": "the anchors file has no cells",
        "renamed.h5ad": "the anchors file shares no gene",
    }
    for name, expected in cases.items():
        bad = tmp_path / f"bad_{name}"
        code = predict_main([*common, f"output={bad}", f"anchors={tmp_path / name}"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()
    # three anchors: placed, too few to calibrate a radius, scored without a traceback
    anchors[:3].copy().write_h5ad(tmp_path / "three.h5ad")
    three = tmp_path / "three_out.h5ad"
    assert predict_main([*common, f"output={three}", f"anchors={tmp_path / 'three.h5ad'}"]) == 0
    assert "median_error" in ad.read_h5ad(three).uns["dpvae"]["scores"]
    capsys.readouterr()
    code = predict_main(
        [*common, f"output={tmp_path / 'r.h5ad'}", "mode=reconstruct", f"anchors={tmp_path}/a"]
    )
    assert code == 2 and "mode=impute" in capsys.readouterr().err
    model = dpvae.load(osmfish_run["run"])
    with pytest.raises(ConfigError, match="mode=impute"):
        model.predict(query, mode="reconstruct", anchors=anchors)
    three_d = anchors.copy()
    three_d.obsm["spatial"] = np.hstack([anchors.obsm["spatial"], np.zeros((anchors.n_obs, 1))])
    with pytest.raises(DataError, match="same dimension"):
        model.predict(query, anchors=three_d)
