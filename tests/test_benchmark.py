"""The benchmark command and its comparators: protocol hygiene, splits, anchors, end to end."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from benchmarks import comparators as C
from benchmarks import protocol as B
from dpvae.data import embedded_path
from dpvae.errors import ConfigError
from dpvae.metrics import median_nn_distance, score_coordinates
from tests.conftest import shared_file as _shared

ROOT = Path(__file__).resolve().parents[1]


def _adata(X: np.ndarray, genes: list[str], coords: np.ndarray, names: list[str]) -> ad.AnnData:
    a = ad.AnnData(
        X=sp.csr_matrix(np.asarray(X, dtype=np.float32)),
        obs=pd.DataFrame({"cls": ["a"] * len(names)}, index=names),
        var=pd.DataFrame(index=genes),
    )
    a.obsm["spatial"] = np.asarray(coords, dtype=np.float64)
    return a


# ----------------------------------------------------------------------------------------------
# hygiene, splits, inputs
# ----------------------------------------------------------------------------------------------


def test_hygiene_drops_blank_genes_zero_cells_and_bad_coordinates() -> None:
    genes = ["Gad2", "Blank-1", "Sst", "Blank_2", "Vip"]
    X = np.array(
        [
            [1, 0, 2, 0, 0],  # kept
            [0, 5, 0, 3, 0],  # expression only in Blank features: zero over kept genes
            [0, 0, 0, 0, 0],  # all zero
            [1, 1, 1, 1, 1],  # NaN coordinate
            [2, 0, 0, 0, 1],  # inf coordinate
            [0, 0, 0, 0, 4],  # kept
        ]
    )
    coords = np.array([[0, 0], [1, 0], [2, 0], [np.nan, 1], [3, np.inf], [4, 4]], dtype=float)
    out = B.hygiene(_adata(X, genes, coords, [f"c{i}" for i in range(6)]))
    assert list(out.var_names) == ["Gad2", "Sst", "Vip"]
    assert list(out.obs_names) == ["c0", "c5"]
    np.testing.assert_array_equal(out.X.toarray(), [[1, 2, 0], [0, 0, 4]])
    np.testing.assert_array_equal(out.obsm["spatial"], [[0, 0], [4, 4]])


def test_transfer_hygiene_keeps_shared_genes_in_reference_order() -> None:
    ref = _adata(
        np.array([[1, 2, 3, 4, 5], [0, 0, 9, 0, 7], [1, 0, 0, 0, 0]]),
        ["C", "A", "Blank_1", "B", "D"],
        np.zeros((3, 2)),
        ["r0", "r1", "r2"],
    )
    query = _adata(
        np.array([[1, 1, 1, 1], [0, 8, 0, 0], [0, 0, 0, 2], [3, 0, 0, 0]]),
        ["B", "E", "A", "C"],
        np.ones((4, 2)),
        ["q0", "q1", "q2", "q3"],
    )
    r, q = B.hygiene_pair(ref, query)
    assert list(r.var_names) == ["C", "A", "B"] == list(q.var_names)
    assert list(r.obs_names) == ["r0", "r2"]  # r1 has only Blank_1 and D
    assert list(q.obs_names) == ["q0", "q2", "q3"]  # q1 has only E
    np.testing.assert_array_equal(q.X.toarray(), [[1, 1, 1], [2, 0, 0], [0, 0, 3]])


@pytest.mark.parametrize(("n", "seed"), [(10, 0), (254, 1), (6430, 2)])
def test_impute_split_is_the_protocols(n: int, seed: int) -> None:
    ref, query = B.impute_split(n, seed)
    perm = np.random.default_rng(seed).permutation(n)
    n_ref = round(0.8 * n)
    np.testing.assert_array_equal(ref, np.sort(perm[:n_ref]))
    np.testing.assert_array_equal(query, np.sort(perm[n_ref:]))
    assert len(ref) == n_ref and len(np.union1d(ref, query)) == n


def test_method_inputs_hide_query_position() -> None:
    a = ad.read_h5ad(embedded_path("osmfish"))[:50].copy()
    r, q = B.method_inputs(a[:40], a[40:])
    assert "spatial" in r.obsm and list(r.obsm) == ["spatial"]
    assert list(q.obsm) == [] and list(q.obs.columns) == [] and list(r.obs.columns) == []
    assert list(q.obs_names) == [f"q{i}" for i in range(10)]
    assert list(q.var_names) == list(r.var_names) == list(a.var_names)
    assert not q.uns and not q.layers


# ----------------------------------------------------------------------------------------------
# comparators
# ----------------------------------------------------------------------------------------------


def _impute_scores(path: Path, method: str, seeds: tuple[int, ...]) -> list[float]:
    full = B.hygiene(ad.read_h5ad(path))
    out = []
    for seed in seeds:
        ri, qi = B.impute_split(full.n_obs, seed)
        r, q = B.method_inputs(full[ri], full[qi])
        P = C.COMPARATORS[method](r, q, seed)
        T = full[qi].obsm["spatial"]
        nn = median_nn_distance(full[ri].obsm["spatial"])
        out.append(score_coordinates(P, T, "impute", ref_nn_distance=nn)["dist_pearson"])
    return out


def test_knn_regression_and_pca_mds_reproduce_osmfish_anchors() -> None:
    path = _shared("osmfish_mouse_sscortex.h5ad")
    knn = _impute_scores(path, "knn_regression", (0, 1, 2))
    mds = _impute_scores(path, "pca_mds", (0, 1, 2))
    # ANCHORS.md: knn_regression 0.491 ± 0.011 (0.482 at seed 0), pca_mds 0.214 ± 0.009
    assert knn[0] == pytest.approx(0.482, abs=0.005)
    assert np.mean(knn) == pytest.approx(0.491, abs=0.005)
    assert np.std(knn, ddof=1) == pytest.approx(0.011, abs=0.005)
    assert np.mean(mds) == pytest.approx(0.214, abs=0.005)


@pytest.mark.parametrize(
    ("fname", "anchor"),
    [("st_breast_cancer_layer1.h5ad", 0.296), ("dlpfc_visium_151673.h5ad", 0.647)],
)
def test_knn_regression_reproduces_transcriptome_anchors(fname: str, anchor: float) -> None:
    """Exercises the 2000-gene selection and the randomized PCA (ANCHORS.md, seed-0 split)."""
    knn = _impute_scores(_shared(fname), "knn_regression", (0,))
    assert knn[0] == pytest.approx(anchor, abs=0.005)


def test_comparators_on_embedded_osmfish_are_in_the_reference_frame() -> None:
    a = B.hygiene(ad.read_h5ad(embedded_path("osmfish")))
    ri, qi = B.impute_split(a.n_obs, 0)
    r, q = B.method_inputs(a[ri], a[qi])
    P = C.knn_regression(r, q, 0)
    assert P.shape == (len(qi), 2) and np.isfinite(P).all()
    lo, hi = r.obsm["spatial"].min(axis=0), r.obsm["spatial"].max(axis=0)
    assert (P >= lo).all() and (P <= hi).all()  # means of reference coordinates
    M = C.pca_mds(r, q, 0)
    assert M.shape == (len(qi), 2) and np.isfinite(M).all()


def test_pca_is_scikit_learns_on_the_selected_genes() -> None:
    rng = np.random.default_rng(0)
    X = rng.poisson(rng.gamma(0.5, 2.0, size=300), size=(120, 300)).astype(float)
    pre = C.fit_preprocessor(sp.csr_matrix(X), n_top_genes=100, n_comps=5)
    assert pre.counts and len(pre.genes) == 100 and pre.pca.n_components_ == 5
    L = C.log_normalize(X, counts=True)[:, pre.genes]
    Lc = L - L.mean(axis=0)
    _, s, vt = np.linalg.svd(Lc, full_matrices=False)
    overlap = np.linalg.svd(vt[:5] @ pre.pca.components_.T, compute_uv=False)
    assert overlap.min() > 0.99  # randomized PCA (120 x 100, k=5) spans the exact subspace
    Z = pre.transform(X[:7])
    np.testing.assert_allclose(Z, (L[:7] - pre.pca.mean_) @ pre.pca.components_.T, atol=1e-10)


def test_pca_mds_is_the_solvers_classical_mds() -> None:
    import torch
    from scipy.spatial.distance import pdist, squareform

    from dpvae.solver import classical_mds

    a = B.hygiene(ad.read_h5ad(embedded_path("osmfish")))[:300].copy()
    r, q = B.method_inputs(a[:200], a[200:])
    Z = C.fit_preprocessor(r.X).transform(q.X)
    expected = classical_mds(torch.from_numpy(squareform(pdist(Z))), 2).numpy()
    np.testing.assert_allclose(C.pca_mds(r, q, 0), expected)
    # the top two principal-component scores of the query, up to sign
    Zc = Z - Z.mean(axis=0)
    u, s, _ = np.linalg.svd(Zc, full_matrices=False)
    np.testing.assert_allclose(np.abs(expected), np.abs(u[:, :2] * s[:2]), atol=1e-8)


def test_gene_selection_ranks_by_log_normalised_variance() -> None:
    rng = np.random.default_rng(1)
    X = rng.poisson(rng.gamma(0.5, 2.0, size=60), size=(200, 60)).astype(float)
    L = C.log_normalize(sp.csr_matrix(X), counts=True)
    top = C.highly_variable_genes(L, n_top=10)
    var = L.toarray().var(axis=0)
    np.testing.assert_array_equal(top, np.sort(np.argsort(-var, kind="stable")[:10]))
    np.testing.assert_array_equal(C.highly_variable_genes(L.toarray(), n_top=10), top)
    np.testing.assert_array_equal(C.highly_variable_genes(L, n_top=100), np.arange(60))


def test_count_detection_and_log_normalisation() -> None:
    X = sp.csr_matrix(np.array([[1.0, 3.0], [0.0, 2.0]]))
    assert C.is_count_matrix(X) and not C.is_count_matrix(X * 0.5)
    L = C.log_normalize(X, counts=True, target_sum=4.0).toarray()
    np.testing.assert_allclose(L, np.log1p([[1.0, 3.0], [0.0, 4.0]]))
    np.testing.assert_allclose(C.log_normalize(X.toarray(), counts=False), np.log1p(X.toarray()))


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bogus=1"], "valid keys"),
        (["+bogus=1"], "valid keys"),
        (["methods=knn_regression,magic"], "valid: dpvae, knn_regression"),
        (["datasets=nope"], "valid: all, "),
        (["tasks=impute,other"], "valid: impute, transfer"),
        (["seeds=a"], "seeds"),
        (["seeds=-1"], "non-negative"),
        (["timeout=-3"], "timeout"),
        (["timeout=soon"], "timeout"),
        (["threads=0"], "threads"),
        (["pairs=osmfish"], "REF->QUERY"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_arguments_name_the_choices(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "osmfish_mouse_sscortex.h5ad").symlink_to(embedded_path("osmfish"))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        B.parse_args([f"data_dir={tmp_path}", *args])


def test_defaults_come_from_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "osmfish_mouse_sscortex.h5ad").symlink_to(embedded_path("osmfish"))
    cfg = B.parse_args([f"data_dir={tmp_path}", "timeout=5", "threads=2"])
    assert cfg.tasks == ("impute", "transfer") and cfg.seeds == (0, 1, 2)
    assert cfg.methods == ("dpvae", "knn_regression", "pca_mds")
    assert cfg.timeout == 5.0 and cfg.threads == 2 and cfg.out == Path("bench_out")
    assert B.parse_args([f"data_dir={tmp_path}"]).threads >= 1  # null: the CPUs available


def test_missing_data_dir_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    assert B.main([f"data_dir={tmp_path / 'absent'}", f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpvae: error: data_dir")


#: each benchmark command, the modules its --help must not import, and keys its --help lists
HELP_CASES = {
    "benchmarks.protocol": (
        ("torch", "anndata"),
        ("data_dir=", "methods=", "seeds=[0,1,2]", "threads=null"),
    ),
    "benchmarks.solver_scaling": (
        ("torch", "anndata"),
        ("task=impute", "n=[10000,100000,1000000]", "threads=1"),
    ),
    "benchmarks.synthetic": (
        ("torch", "anndata", "h5py"),
        ("out=???", "n_cells=", "density=0.1", "sections=1", "dense=false"),
    ),
    "benchmarks.stopping": (
        ("torch", "anndata"),
        ("replay=[]", "out=bench_out/stop", "seeds=[0,1,2]", "tasks=[impute,transfer]"),
    ),
    "benchmarks.scale": (
        ("torch", "anndata", "h5py"),
        ("cells=[100000,250000,1000000]", "modes=[memory,streaming]", "max_rss_gb=12.0"),
    ),
}


@pytest.mark.parametrize("module", list(HELP_CASES))
def test_help_lists_the_yaml_keys_without_importing_torch_or_anndata(module: str) -> None:
    heavy, keys = HELP_CASES[module]
    code = (
        f"import sys; from {module} import main; rc = main(['--help']); "
        f"heavy = [m for m in {heavy!r} if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(rc)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    for key in keys:
        assert key in res.stdout


def test_solver_scaling_checks_its_values() -> None:
    from benchmarks import solver_scaling as S
    from dpvae.config import load_config

    def cfg(*args: str):
        return load_config(list(args), conf_dir=S.CONF_DIR, root_file=S.ROOT_FILE)

    assert S.config_from(cfg("n=100,200", "task=reconstruct")) == ("reconstruct", [100, 200], 1)
    for args, needle in ((["task=solve"], "valid: impute, reconstruct"), (["n=0"], "n must")):
        with pytest.raises(ConfigError, match=needle):
            S.config_from(cfg(*args))


def test_dataset_ids_and_default_pairs(tmp_path: Path) -> None:
    for fname in ("dlpfc_visium_151673.h5ad", "dlpfc_visium_151674.h5ad", "extra_section.h5ad"):
        (tmp_path / fname).touch()
    cfg = B.parse_args([f"data_dir={tmp_path}"])
    assert set(cfg.impute_units) == {"dlpfc_151673", "dlpfc_151674", "extra_section"}
    assert cfg.transfer_units == (("dlpfc_151673", "dlpfc_151674"),)
    cfg = B.parse_args([f"data_dir={tmp_path}", "datasets=dlpfc_151673"])
    assert cfg.impute_units == ("dlpfc_151673",) and cfg.transfer_units == ()
    cfg = B.parse_args(
        [f"data_dir={tmp_path}", "tasks=transfer", "pairs=extra_section->dlpfc_151673"]
    )
    assert cfg.impute_units == () and cfg.transfer_units == (("extra_section", "dlpfc_151673"),)


def test_a_failing_method_is_recorded_not_raised() -> None:
    a = ad.read_h5ad(embedded_path("osmfish"))[:60].copy()
    r, q = B.method_inputs(a[:50], a[50:, ::-1])  # genes in a different order
    res = B.run_method("knn_regression", r, q, "impute", 0, timeout=120, threads=1)
    assert res.status.startswith("error: ValueError") and "same genes" in res.status
    if importlib.util.find_spec("CeLEry") is None:
        assert B.run_method("celery", r, q, "impute", 0).status == "not installed"


def test_the_two_commands_place_cells_as_the_python_api_does() -> None:
    """dpvae_cli (train.py, then dpvae.predict, each a new process) is the API's fit_predict."""
    a = ad.read_h5ad(embedded_path("osmfish"))[:700].copy()
    r, q = B.method_inputs(a[:600], a[600:])
    extras = {"dpvae_overrides": ("trainer.max_epochs=3", "model.warmup_epochs=1")}
    api = B.run_method("dpvae", r, q, "impute", 0, timeout=300, threads=1, extras=extras)
    cli = B.run_method("dpvae_cli", r, q, "impute", 0, timeout=300, threads=1, extras=extras)
    assert api.status == cli.status == "ok", (api.status, cli.status)
    assert api.coords is not None and cli.coords is not None
    np.testing.assert_allclose(cli.coords, api.coords, rtol=1e-5, atol=1e-3)
    assert api.radius is not None and cli.radius is not None
    np.testing.assert_allclose(cli.radius, api.radius, rtol=1e-5)
    assert cli.wall_s > api.wall_s  # two processes' start-up on top


def test_smoke_run_writes_csv_markdown_and_figures(tmp_path: Path) -> None:
    full = ad.read_h5ad(embedded_path("osmfish"))
    keep = np.argsort(np.linalg.norm(full.obsm["spatial"] - full.obsm["spatial"].mean(0), axis=1))
    small = full[np.sort(keep[:700])].copy()
    data = tmp_path / "data"
    data.mkdir()
    small[:400].copy().write_h5ad(data / "osmfish_mouse_sscortex.h5ad")
    small[400:].copy().write_h5ad(data / "osmfish_part2.h5ad")
    out = tmp_path / "out"
    code = B.work(
        B.compose(
            [
                f"data_dir={data}",
                "tasks=impute,transfer",
                "methods=knn_regression,pca_mds",
                "seeds=0",
                "datasets=osmfish_sscortex",
                "pairs=osmfish_sscortex->osmfish_part2",
                f"out={out}",
                "threads=1",
            ]
        )
    )
    assert code == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["task"], r["method"], r["status"]) for r in rows] == [
        ("impute", "knn_regression", "ok"),
        ("impute", "pca_mds", "ok"),
        ("transfer", "knn_regression", "ok"),
        ("transfer", "pca_mds", "ok"),
    ]
    assert float(rows[0]["dist_pearson"]) > 0.2 and float(rows[0]["median_error"]) > 0
    assert rows[1]["median_error"] == ""  # frame-free: rotation-invariant scores only
    assert float(rows[2]["procrustes_rmse"]) > 0 and float(rows[0]["peak_mb"]) > 0
    md = (out / "results.md").read_text()
    assert "| impute | osmfish_sscortex | knn_regression |" in md
    assert "| transfer | osmfish_sscortex->osmfish_part2 | pca_mds |" in md
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == [
        "impute__osmfish_sscortex.png",
        "transfer__osmfish_sscortex__to__osmfish_part2.png",
    ]
    assert (out / "figures" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identity_units_and_their_errors(tmp_path: Path) -> None:
    from benchmarks import identity

    assert identity._unit("osmfish_sscortex:impute:2") == ("osmfish_sscortex", "", "impute", 2)
    assert identity._unit("a->b:transfer:0") == ("a", "b", "transfer", 0)
    with pytest.raises(ConfigError, match="a unit is"):
        identity._unit("osmfish")
    assert identity.main(["units=osmfish:impute", f"out={tmp_path / 'x.npz'}"]) == 2
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------------------------
# the synthetic reference and the scale benchmark
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True])
def test_synthetic_reference_has_its_shape_density_counts_and_spatial_structure(
    tmp_path: Path, dense: bool
) -> None:
    from scipy.spatial import cKDTree

    from benchmarks import synthetic

    out = tmp_path / "synth.h5ad"
    args = [f"out={out}", "n_cells=3000", "n_genes=300", "density=0.1", "sections=2", "seed=3"]
    assert synthetic.main([*args, f"dense={str(dense).lower()}"]) == 0
    paths = [tmp_path / "synth_s0.h5ad", tmp_path / "synth_s1.h5ad"]
    assert sorted(tmp_path.iterdir()) == paths  # no temporaries left behind
    s0, s1 = (ad.read_h5ad(p) for p in paths)
    for a in (s0, s1):
        assert a.shape == (3000, 300) and a.obsm["spatial"].shape == (3000, 2)
        assert sp.issparse(a.X) != dense
        X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        assert abs((X > 0).mean() - 0.1) < 0.015
        assert np.array_equal(X, np.round(X)) and X.min() == 0 and X.max() > 3
        assert (X.sum(1) > 0).all() and a.obs_names.is_unique
    assert list(s0.var_names) == list(s1.var_names) and s0.obs_names[0] == "s0_c0"
    # expression depends on position: kNN in expression space places held-out cells far better
    # than chance (the mean distance between two random cells is ~0.52 of the side)
    side = s0.uns["synthetic"]["side"]
    logx = np.log1p(s0.X.toarray() if sp.issparse(s0.X) else s0.X)
    logx -= logx.mean(0)
    pcs = logx @ np.linalg.svd(logx, full_matrices=False)[2][:20].T
    xy = s0.obsm["spatial"]
    _, nn = cKDTree(pcs[:2500]).query(pcs[2500:], 10)
    error = np.linalg.norm(xy[:2500][nn].mean(1) - xy[2500:], axis=1)
    assert np.median(error) < 0.2 * side
    # section 1 is the same tissue in another frame: undoing its rotation and shift puts it back
    info = s1.uns["synthetic"]
    assert info["angle"] != 0 and s0.uns["synthetic"]["angle"] == 0
    c, s = np.cos(info["angle"]), np.sin(info["angle"])
    back = (s1.obsm["spatial"] - side / 2 - info["shift"]) @ np.array([[c, -s], [s, c]]) + side / 2
    assert back.min() > -1e-6 and back.max() < side + 1e-6
    assert not (s1.obsm["spatial"].min() > -1e-6 and s1.obsm["spatial"].max() < side + 1e-6)
    assert synthetic.main([f"out={tmp_path / 'x.txt'}"]) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["modes=disk"], "unknown mode 'disk'"),
        (["cells=10"], "cells must be"),
        (["epochs=0"], "epochs"),
    ],
)
def test_scale_checks_its_values(tmp_path: Path, args: list[str], needle: str, capsys) -> None:
    from benchmarks import scale

    assert scale.main([*args, f"out={tmp_path / 'o'}", f"data_dir={tmp_path / 'd'}"]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_scale_run_writes_json_table_and_figure_with_every_stage(tmp_path: Path) -> None:
    import json

    from benchmarks import scale

    out, data = tmp_path / "out", tmp_path / "data"
    args = ["cells=2000", "modes=streaming", "epochs=1", f"out={out}", f"data_dir={data}"]
    assert scale.main([*args, "n_genes=200", "train_args=[data.batch_size=128]"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["machine"]["cpu_count"] >= 1 and doc["config"]["cells"] == [2000]
    (run,) = doc["runs"]
    assert run["status"] == "ok" and run["mode"] == "streaming" and run["cells"] == 2000
    assert set(scale.STAGES) <= set(run["stages"])
    for stage in scale.STAGES:
        assert run["stages"][stage]["seconds"] >= 0 and run["stages"][stage]["peak_mb"] > 0
    assert run["cells_per_s"] > 0 and run["train_cells"] + run["val_cells"] == 2000
    assert run["torch_threads"] == 1 and "dist_pearson" in run["scores"]
    md = (out / "results.md").read_text()
    assert "| 2,000 | streaming |" in md and "predict 1M query" in md and "Machine:" in md
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in data.iterdir()) == [
        "synth_2000x200_d0.1_seed0_query.h5ad",
        "synth_2000x200_d0.1_seed0_ref.h5ad",
    ]
