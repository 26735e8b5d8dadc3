"""What a user sees: quiet logs with the scores in them, figures a biologist can read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pytest

import dpvae
from dpvae.plotting import align_for_display, prediction_figure

matplotlib.use("Agg")  # the test's own choice; the library never sets a backend

ROOT = Path(__file__).resolve().parents[1]


def test_a_logged_run_is_small_quiet_and_shows_the_scores(
    osmfish_small: Path, tmp_path: Path
) -> None:
    """train.py into a file (as under nohup or a batch job): one line per epoch, no warnings,
    no progress bar, the warm-up switch said, a summary, training.png written."""
    log = tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT",)}
    with open(log, "w") as fh:
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                f"data.reference={osmfish_small}",
                f"run_dir={tmp_path / 'run'}",
                "trainer.max_epochs=6",
                "model.warmup_epochs=2",
                "callbacks.spatial.every_n_epochs=3",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.strip().splitlines()
    assert log.stat().st_size < 4000, text
    assert all(line.startswith("dpvae: ") for line in lines), text
    assert not any("warning" in line.lower() for line in lines), text
    epochs = [line for line in lines if line.startswith("dpvae: epoch ") and "/6" in line]
    assert len(epochs) == 6  # one line per epoch
    scored = [line for line in epochs if "| val dist_pearson" in line]
    assert len(scored) == 2 and all("cell spacings" in line for line in scored)
    assert any("the distance regularizer switches on" in line for line in lines)
    summary = next(line for line in lines if line.startswith("dpvae: done: "))
    assert "best" in summary and "lambda" in summary and str(tmp_path / "run") in summary
    assert (tmp_path / "run" / "training.png").stat().st_size > 20_000
    wandb_files = list((tmp_path / "run" / "wandb").rglob("*.wandb"))
    assert wandb_files and all(f.stat().st_size < 200_000 for f in wandb_files)


def test_the_prediction_figure_names_what_it_shows(osmfish_run: dict[str, Path]) -> None:
    model = dpvae.load(osmfish_run["run"])
    query = ad.read_h5ad(osmfish_run["query"])
    query = query[np.asarray(query.X.sum(axis=1)).ravel() > 0].copy()
    out = model.annotate(query.copy())
    fig = prediction_figure(out, "ClusterName")
    names = sorted({str(c) for c in query.obs["ClusterName"]})
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == names  # class names
    assert [ax.get_aspect() for ax in fig.axes[:2]] == [1.0, 1.0]
    assert "cell spacings" in fig._suptitle.get_text()
    gene = model.genes[0]
    fig = prediction_figure(out, gene)
    assert fig.axes[-1].get_ylabel() == f"log1p({gene} expression)"  # the colour bar's name
    with pytest.raises(Exception, match="neither an obs column nor a gene"):
        prediction_figure(out, "NoSuchThing")


def test_reconstruct_is_aligned_onto_the_truth_for_display() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=(200, 2)) * 100
    angle = 1.1
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    layout = (truth @ rot) * 0.01 - 7.0  # another frame: rotated, scaled, shifted
    layout[:, 0] *= -1  # and reflected
    np.testing.assert_allclose(align_for_display(layout, truth), truth, atol=1e-8)
