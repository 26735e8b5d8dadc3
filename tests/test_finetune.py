"""Fine-tuning a trained model on a few cells of known position (``init_from``)."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import dpvae
from dpvae.cli import predict_main, train_main
from dpvae.module import DPVAE


def _anchors(query: Path, tmp: Path, n: int = 13, shift: float = 0.0) -> tuple[Path, Path]:
    """``n`` cells of the query as anchors (in a frame shifted by ``shift``), the rest as query."""
    q = ad.read_h5ad(query)
    perm = np.random.default_rng(0).permutation(q.n_obs)
    anchors = q[np.sort(perm[:n])].copy()
    anchors.obsm["spatial"] = anchors.obsm["spatial"] + shift
    rest = q[np.sort(perm[n:])].copy()
    rest.obsm["spatial"] = rest.obsm["spatial"] + shift
    paths = tmp / "anchors.h5ad", tmp / "rest.h5ad"
    anchors.write_h5ad(paths[0])
    rest.write_h5ad(paths[1])
    return paths


def _train(args: list[str]) -> int:
    return train_main([*args, "logger=none", "trainer.enable_progress_bar=false"])


def test_fine_tuning_on_13_anchors_then_placing_the_rest(
    osmfish_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors, rest = _anchors(osmfish_run["query"], tmp_path, shift=1e4)
    base = osmfish_run["run"] / "model.ckpt"
    run = tmp_path / "tuned"
    code = _train(
        [
            f"init_from={base}",
            f"data.reference={anchors}",
            f"run_dir={run}",
            "callbacks.freeze.modules=[encoder.body.0]",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "fine-tuning data: 13 cells on the model's" in err
    assert re.search(r"done: 40 epochs", err)  # the short default schedule
    before = DPVAE.load_from_checkpoint(base)
    after = DPVAE.load_from_checkpoint(run / "model.ckpt")
    assert after.genes == before.genes
    # the frozen first layer kept its weights and batch-norm statistics; the rest moved
    for name in ("encoder.body.0.weight", "encoder.body.0.bias"):
        assert torch.equal(before.state_dict()[name], after.state_dict()[name]), name
    assert not torch.equal(
        before.state_dict()["encoder.mu.weight"], after.state_dict()["encoder.mu.weight"]
    )
    # the anchors' own frame: centred on them
    anchor_xy = ad.read_h5ad(anchors).obsm["spatial"]
    np.testing.assert_allclose(after.preprocessor.coord_center, anchor_xy.mean(axis=0))
    out = tmp_path / "placed.h5ad"
    code = predict_main(
        [
            f"checkpoint={run / 'model.ckpt'}",
            f"query={rest}",
            f"reference={anchors}",
            f"output={out}",
        ]
    )
    assert code == 0
    placed = ad.read_h5ad(out)
    xy = placed.obsm["spatial_dpvae"]
    truth = placed.obsm["spatial"]
    # placed in the anchors' (shifted) frame, near the truth on average
    assert np.linalg.norm(np.nanmean(xy, axis=0) - truth.mean(axis=0)) < 0.2 * np.ptp(truth[:, 0])


def test_fine_tuning_from_python(osmfish_run: dict[str, Path], tmp_path: Path) -> None:
    anchors, rest = _anchors(osmfish_run["query"], tmp_path, n=40)
    model = dpvae.load(osmfish_run["run"])
    tuned = model.fine_tune(ad.read_h5ad(anchors), "trainer.max_epochs=5")
    assert len(tuned.reference) == 40 and tuned.genes == model.genes
    xy = tuned.predict(ad.read_h5ad(rest))
    # every cell placed (cells without expression get NaN, by the rule of prediction)
    assert xy.shape == (ad.read_h5ad(rest).n_obs, 2) and np.isfinite(xy).all(axis=1).mean() > 0.95
    # the original model is left as it was
    assert torch.equal(
        model.module.state_dict()["encoder.mu.weight"],
        dpvae.load(osmfish_run["run"]).module.state_dict()["encoder.mu.weight"],
    )


@pytest.mark.parametrize(
    "case", ["foreign_checkpoint", "no_coordinates", "no_shared_gene", "freeze"]
)
def test_bad_fine_tuning_input_is_one_line(
    case: str,
    osmfish_run: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    anchors, _ = _anchors(osmfish_run["query"], tmp_path)
    base = osmfish_run["run"] / "model.ckpt"
    args = [f"init_from={base}", f"data.reference={anchors}"]
    if case == "foreign_checkpoint":
        other = tmp_path / "other.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
        args[0], message = f"init_from={other}", "not a dpvae model checkpoint"
    elif case == "no_coordinates":
        a = ad.read_h5ad(anchors)
        del a.obsm["spatial"]
        a.write_h5ad(anchors)
        message = r"no coordinates under obsm\['spatial'\]"
    elif case == "no_shared_gene":
        a = ad.read_h5ad(anchors)
        a.var_names = [f"other{i}" for i in range(a.n_vars)]
        a.write_h5ad(anchors)
        message = "shares no gene with the model's"
    else:
        args.append("callbacks.freeze.modules=[encoder.first]")
        message = "callbacks.freeze.modules names 'encoder.first'"
    run = tmp_path / "run"
    code = _train([*args, f"run_dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dpvae: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (run / "config.yaml").exists() and not (run / "model.ckpt").exists()
