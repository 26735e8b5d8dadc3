"""A run's files are never lost: refused resumes, busy folders, broken checkpoints, permissions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

from dpvae.cli import train_main

FAST = ["logger=none", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(osmfish_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    assert train_main([f"data.reference={osmfish_small}", f"run_dir={run_dir}", *FAST]) == 0
    return run_dir


def _refused(args: list[str], run_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    before = _digest(run_dir)
    code = train_main([f"run_dir={run_dir}", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    # a warning on the way (printed here when pytest does not capture warnings: -p no:warnings)
    # is not the error; a traceback would still leave more than one line
    warned = ("dpvae: warning:", "  ")
    err = [line for line in lines if not line.startswith(warned) and "Warning: " not in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("dpvae: error: "), lines
    assert _digest(run_dir) == before  # nothing of the run was touched
    return err[0]


def test_resume_with_another_model_is_refused(
    finished_run: Path, osmfish_small: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused(
        [f"data.reference={osmfish_small}", *FAST, "model.latent_dim=8"], finished_run, capsys
    )
    assert "model.latent_dim is 16 in that run but 8 in this command" in line


def test_resume_with_other_data_is_refused(
    finished_run: Path, osmfish_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.h5ad"
    ad.read_h5ad(osmfish_small)[:900].copy().write_h5ad(other)
    line = _refused([f"data.reference={other}", *FAST], finished_run, capsys)
    assert "the reference data differ" in line and "other.h5ad" in line


def test_a_busy_folder_is_refused_and_a_stale_lock_taken_over(
    finished_run: Path, osmfish_small: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (finished_run / ".lock").write_text(f"{sleeper.pid}\n")
        line = _refused([f"data.reference={osmfish_small}", *FAST], finished_run, capsys)
        assert f"in use by training process {sleeper.pid}" in line
    finally:
        sleeper.kill()
        sleeper.wait()
    (finished_run / ".lock").write_text(f"{sleeper.pid}\n")  # its process is gone: stale
    args = [f"run_dir={finished_run}", f"data.reference={osmfish_small}", *FAST]
    assert (
        train_main([*args[:-2], "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]) == 0
    )
    assert not (finished_run / ".lock").exists()  # released at the end


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\x80\x02cos\nsystem\n."])
def test_a_broken_checkpoint_is_one_line(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "last.ckpt").write_bytes(content)
    line = _refused(["logger=none"], tmp_path, capsys)
    assert "cannot be read as a dpvae checkpoint" in line
    assert "weights_only" not in line


def test_outputs_follow_the_umask(finished_run: Path) -> None:
    """Files of a run are readable by the group and others under the usual umask 022."""
    for name in ("config.yaml", "embedding.h5ad", "model.ckpt"):
        mode = (finished_run / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~_umask(), (name, oct(mode))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_killed_write_leaves_no_temporary(tmp_path: Path, osmfish_small: Path) -> None:
    from dpvae.io import write_h5ad_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.h5ad.{dead.pid}.tmp"
    stale.write_bytes(b"half")
    write_h5ad_atomic(ad.read_h5ad(osmfish_small)[:10].copy(), tmp_path / "out.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]


def test_a_saved_model_folder_predicts_but_is_not_resumed(
    finished_run: Path, osmfish_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dpvae

    saved = dpvae.load(finished_run).save(tmp_path / "saved")
    line = _refused([f"data.reference={osmfish_small}", *FAST], saved, capsys)
    assert "without its training state" in line


def test_a_finished_or_early_stopped_run_is_left_alone(
    osmfish_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        f"data.reference={osmfish_small}",
        f"run_dir={tmp_path}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.max_epochs=30",
        "model.warmup_epochs=1",
        "callbacks.early_stopping.monitor=val/loss",
        "callbacks.early_stopping.patience=1",
        "+callbacks.early_stopping.min_delta=0.5",
    ]
    assert train_main(args) == 0
    before = _digest(tmp_path)
    capsys.readouterr()
    assert train_main(args) == 0
    said = capsys.readouterr().err
    assert "already holds a finished run" in said and "the stopping rule ended it" in said
    assert _digest(tmp_path) == before
    # a run that trained all its epochs: how to train it longer names its folder (the default
    # run_dir hashes the configuration, trainer.max_epochs included)
    short = [
        *args[:4],
        "trainer.max_epochs=2",
        "model.warmup_epochs=1",
        f"run_dir={tmp_path / 's'}",
    ]
    assert train_main(short) == 0
    capsys.readouterr()
    assert train_main(short) == 0
    said = capsys.readouterr().err
    assert f"give run_dir={tmp_path / 's'} and a trainer.max_epochs above 2" in said, said


def test_no_checkpoint_callback_writes_no_checkpoint_and_is_not_rerun_over(
    osmfish_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        f"data.reference={osmfish_small}",
        f"run_dir={tmp_path}",
        *FAST,
        "callbacks.checkpoint=null",
    ]
    assert train_main(args) == 0
    assert not list(tmp_path.rglob("*.ckpt")) and (tmp_path / "embedding.h5ad").exists()
    capsys.readouterr()
    line = _refused(args[:1] + args[2:], tmp_path, capsys)
    assert "no checkpoint to resume" in line
