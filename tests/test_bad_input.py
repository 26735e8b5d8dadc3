"""Bad input: one clear line, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from dpvae.cli import train_main

ROOT = Path(__file__).resolve().parents[1]


def _adata(n: int = 50, g: int = 6, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n, g)).astype(np.float32) + 1
    a = ad.AnnData(X=sp.csr_matrix(x))
    a.var_names = [f"g{i}" for i in range(g)]
    a.obsm["spatial"] = rng.uniform(size=(n, 2))
    return a


def _bad_files(tmp: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp / "notes.h5ad"
    text.write_text("gene,x,y\n")
    nocoord = _adata()
    del nocoord.obsm["spatial"]
    nocoord.obsm["xy"] = np.zeros((50, 2))
    nocoord.write_h5ad(tmp / "nocoord.h5ad")
    nonfinite = _adata()
    nonfinite.obsm["spatial"][3, 0] = np.nan
    nonfinite.write_h5ad(tmp / "nonfinite.h5ad")
    _adata(n=5).write_h5ad(tmp / "tiny.h5ad")
    negative = _adata()
    negative.X = sp.csr_matrix(negative.X.toarray() - 2.5)
    negative.write_h5ad(tmp / "negative.h5ad")
    return {
        "missing": ([f"data.reference={tmp / 'nope.h5ad'}"], "no such file"),
        "not_h5ad": ([f"data.reference={text}"], "not an .h5ad file"),
        "no_coords": (
            [f"data.reference={tmp / 'nocoord.h5ad'}"],
            r"no coordinates under obsm\['spatial'\].*xy",
        ),
        "nonfinite": (
            [f"data.reference={tmp / 'nonfinite.h5ad'}"],
            "1 cells have non-finite coordinates",
        ),
        "too_few": ([f"data.reference={tmp / 'tiny.h5ad'}"], "only 5 usable cells"),
        "negative_counts": (
            [f"data.reference={tmp / 'negative.h5ad'}", "model.likelihood=nb"],
            "needs raw counts but the data has negative values",
        ),
        "unknown_key": (["trainer.max_epoch=3"], "unknown key 'trainer.max_epoch'"),
        "not_an_integer": (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer"),
        "not_a_number": (["model.lr=fast"], "model.lr must be a number"),
        "not_a_bool": (["data.scale=maybe"], "data.scale must be true or false"),
        "unknown_kwarg": (["+model.encoder.depth=3"], "cannot build dpvae.nn.MLPEncoder.*takes"),
        "embedding_batch": (["embedding.batch_size=0"], "embedding.batch_size must be at least 1"),
        "monitor_typo": (
            ["callbacks.checkpoint.monitor=val/dist_pearsn"],
            "monitors 'val/dist_pearsn', which this run does not log",
        ),
        "stopping_monitor_typo": (
            ["callbacks.early_stopping.monitor=val/los"],
            "WarmupEarlyStopping monitors 'val/los', which this run does not log",
        ),
        "stopping_mode": (
            ["callbacks.early_stopping.mode=up"],
            "callbacks.early_stopping.mode must be min or max, got 'up'",
        ),
        "checkpoint_interval": (
            ["callbacks.checkpoint.every_n_seconds=-1"],
            "callbacks.checkpoint.every_n_seconds must be 0 or more, got -1",
        ),
        "stopping_patience": (
            ["callbacks.early_stopping.patience=0"],
            "callbacks.early_stopping.patience must be at least 1",
        ),
        "monitor_no_val": (
            ["data.val_fraction=0", "callbacks.checkpoint.monitor=val/loss"],
            "no validation cells",
        ),
        "monitor_few_val": (
            [
                "data.val_fraction=0.0003",  # 2 validation cells: no spatial score
                "callbacks.checkpoint.monitor=val/dist_pearson",
                "callbacks.checkpoint.mode=max",
            ],
            "spatial scores need 3 validation cells in a section: raise data.val_fraction",
        ),
        "finetune_folds": (["finetune.folds=-1"], "finetune.folds must be at least 0, got -1"),
        "regularizer_scales": (
            ["model.regularizer.init_scale=-1"],
            "min_scale <= init_scale <= max_scale, got .*init_scale=-1.0",
        ),
        "regularizer_relative": (
            ["model.regularizer.relative=5"],
            r"model.regularizer.relative must be in \[0, 1\], got 5.0",
        ),
        "optimizer": (
            ["model.optimizer=adam"],
            "model.optimizer must be one of fused, foreach, loop, got 'adam'",
        ),
        "unknown_option": (
            ["model.likelihood=poisson"],
            "unknown option 'poisson'.*gaussian, nb, zinb",
        ),
    }


CASES = [
    "missing",
    "not_h5ad",
    "no_coords",
    "nonfinite",
    "too_few",
    "negative_counts",
    "unknown_key",
    "unknown_option",
    "not_an_integer",
    "not_a_number",
    "not_a_bool",
    "unknown_kwarg",
    "embedding_batch",
    "monitor_typo",
    "monitor_no_val",
    "monitor_few_val",
    "finetune_folds",
    "stopping_monitor_typo",
    "stopping_mode",
    "stopping_patience",
    "checkpoint_interval",
    "regularizer_scales",
    "regularizer_relative",
    "optimizer",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, message = _bad_files(tmp_path)[case]
    run_dir = tmp_path / "run"
    code = train_main([*args, f"run_dir={run_dir}", "logger=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dpvae: error: ")
    import re

    assert re.search(message, err[0]), err[0]
    assert not (run_dir / "model.ckpt").exists() and not (run_dir / "config.yaml").exists()


def test_cli_has_no_traceback(tmp_path: Path) -> None:
    """The real command: non-zero exit, one stderr line, no Python traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"data.reference={tmp_path / 'missing.h5ad'}",
            "logger=none",
            f"run_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dpvae: error: ")
    assert "no such file" in proc.stderr


def test_existing_run_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"precious")
    code = train_main([f"run_dir={tmp_path}", "resume=false", "logger=none"])
    assert code == 2
    assert "already holds model.ckpt" in capsys.readouterr().err
    assert (tmp_path / "model.ckpt").read_bytes() == b"precious"


def test_a_command_s_fast_exit_keeps_its_status_output_and_exit_handlers() -> None:
    """exit_now skips the interpreter's module teardown, not what a process must finish."""
    code = (
        "import atexit, sys\n"
        "from dpvae.cli import exit_now\n"
        "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
        "print('unflushed', end='')\n"
        "exit_now(3)\n"
        "print('never')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "unflushed"
    assert proc.stderr.strip() == "handler ran"


def _owners() -> dict[str, tuple[object, str]]:
    from dpvae.callbacks import RunCheckpoint, SpatialValidation, WarmupEarlyStopping
    from dpvae.datamodules import ReferenceDataModule
    from dpvae.nn import MLPDecoder, MLPEncoder
    from dpvae.regularizers import StressRegularizer

    return {
        "encoder": (lambda: MLPEncoder(10, 4, dropout=2.0), "dropout must be in"),
        "decoder": (lambda: MLPDecoder(4, 10, norm="group"), "unknown norm 'group'"),
        "regularizer": (lambda: StressRegularizer(max_scale=0.0), "min_scale <= init_scale"),
        "datamodule": (lambda: ReferenceDataModule("osmfish", batch_size=1), "batch_size must"),
        "checkpoint": (lambda: RunCheckpoint(".", every_n_seconds=-1), "every_n_seconds must"),
        "stopping": (lambda: WarmupEarlyStopping(patience=0), "patience must be at least 1"),
        "spatial": (lambda: SpatialValidation(max_query=0), "max_query must be at least 1"),
    }


@pytest.mark.parametrize(
    "owner",
    ["encoder", "decoder", "regularizer", "datamodule", "checkpoint", "stopping", "spatial"],
)
def test_owners_check_their_rules_from_python(owner: str) -> None:
    """The command checks these before its imports; built from Python (a user's own pipeline),
    each class checks the same rules with the same one-line error."""
    from dpvae.errors import ConfigError

    build, message = _owners()[owner]
    with pytest.raises(ConfigError, match=message):
        build()  # type: ignore[operator]


def test_the_api_checks_the_model_s_values(osmfish_small: Path) -> None:
    """``dpvae.fit`` (no command in front of it) refuses a bad model value, one line."""
    import dpvae
    from dpvae.errors import ConfigError

    with pytest.raises(ConfigError, match="model.lr must be 0 or more"):
        dpvae.fit(str(osmfish_small), "model.lr=-1", "logger=none")
