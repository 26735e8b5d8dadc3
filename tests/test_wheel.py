"""A wheel, not the checkout: build it, install it into a fresh venv, train and predict elsewhere."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_trains_fine_tunes_and_predicts_outside_the_checkout(
    tmp_path: Path, osmfish_small: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DPVAE_CONFIG_PATH")}
    env.update(WANDB_MODE="offline", MPLBACKEND="Agg", PIP_DISABLE_PIP_VERSION_CHECK="1")
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("dpvae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dpvae"}  # nothing generic (datamodules, callbacks, conf) at the top level
    assert "dpvae/conf/train.yaml" in names and "dpvae/conf/model/likelihood/nb.yaml" in names
    assert "dpvae/datamodules/reference.py" in names and "dpvae/callbacks/checkpoint.py" in names
    assert not any(n.startswith(("dpvae/benchmark", "benchmarks/")) for n in names)

    # a fresh venv; its dependencies come from this environment's site-packages through a .pth
    # file (no download), where the checkout's editable dpvae is not importable
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    purelib = _run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env
    ).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp_path,
        env,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import dpvae; print(dpvae.__file__)"], work, env).stdout
    assert where.strip().startswith(str(venv))
    train = [
        str(venv / "bin" / "dpvae-train"),
        f"data.reference={osmfish_small}",
        "run_dir=run",
        "logger=csv",
        "trainer.max_epochs=2",
        "model.warmup_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    _run(train, work, env)
    for name in ("model.ckpt", "config.yaml", "embedding.h5ad", "csv/version_0/metrics.csv"):
        assert (work / "run" / name).exists(), name
    out = _run(
        [
            str(venv / "bin" / "dpvae-predict"),
            "checkpoint=run/model.ckpt",
            f"query={osmfish_small}",
            "output=pred.h5ad",
        ],
        work,
        env,
    )
    assert "dist_pearson 0." in out.stdout and (work / "pred.h5ad").exists()

    # fine-tuning on 60 cells of known position, then the rest placed in their frame with a
    # radius, its median in cell spacings printed and the figure shaded by it
    cells = ad.read_h5ad(osmfish_small)
    pick = np.zeros(cells.n_obs, dtype=bool)
    pick[np.random.default_rng(0).choice(cells.n_obs, 60, replace=False)] = True
    cells[pick].copy().write_h5ad(work / "anchors.h5ad")
    cells[~pick].copy().write_h5ad(work / "rest.h5ad")
    tuned = [
        str(venv / "bin" / "dpvae-train"),
        "init_from=run/model.ckpt",
        "data.reference=anchors.h5ad",
        "run_dir=tuned",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    err = _run(tuned, work, env).stderr
    assert "fine-tuning data:" in err and "fine-tuning cross-validation (5 folds)" in err, err
    out = _run(
        [
            str(venv / "bin" / "dpvae-predict"),
            "checkpoint=tuned/model.ckpt",
            "query=rest.h5ad",
            "reference=anchors.h5ad",
            "output=placed.h5ad",
            "plot=dpvae_radius90",
        ],
        work,
        env,
    )
    assert "90% radius: median" in out.stdout and "cell spacings" in out.stdout, out.stdout
    placed = ad.read_h5ad(work / "placed.h5ad")
    radius = placed.obs["dpvae_radius90"].to_numpy()
    assert placed.n_obs == cells.n_obs - 60
    assert np.isfinite(radius).mean() > 0.99 and (radius[np.isfinite(radius)] > 0).all()
    calibration = placed.uns["dpvae"]["radius"]["calibration"]  # out-of-fold anchors, either route
    assert "cross-validation over the" in calibration or "other folds' anchors" in calibration
    assert (work / "placed.png").stat().st_size > 10_000
    script = (
        "import anndata as ad, dpvae\n"
        f"a = ad.read_h5ad({str(osmfish_small)!r})\n"
        "m = dpvae.fit(a, 'trainer.max_epochs=2', 'model.warmup_epochs=1')\n"
        "xy = m.predict(a[:100].copy())\n"
        "assert xy.shape == (100, 2), xy.shape\n"
        "m.save('saved')\n"
        "assert (dpvae.load('saved').predict(a[:100].copy()) == xy).all()\n"
        "print('api ok')\n"
    )
    assert "api ok" in _run([str(py), "-c", script], work, env).stdout
