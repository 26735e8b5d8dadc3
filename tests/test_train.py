"""Training end to end: every conf option, checkpoints, resume, and learning on real data."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr

from dpvae.datamodules import ReferenceDataModule
from dpvae.module import DPVAE
from tests.conftest import run_train

FAST = ["+trainer.enable_model_summary=false"]

# every option of every conf group appears at least once; latent sizes 2 and 3 included
COMBOS = [
    ["model.likelihood=gaussian", "model.regularizer=dp", "logger=csv", "model.latent_dim=2"],
    [
        "model.likelihood=nb",
        "model.regularizer=stress",
        "logger=none",
        "model.latent_dim=3",
        "model.encoder.norm=layer",
        "model.decoder.norm=none",
    ],
    [
        "model.likelihood=zinb",
        "model.regularizer=none",
        "logger=wandb",
        "model.encoder.hidden=[32,16]",
        "model.distance_on=sample",
    ],
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(x.split("=")[1] for x in c[:3]))
def test_every_option_trains(combo: list[str], osmfish_small: Path, tmp_path: Path) -> None:
    run_dir = run_train(
        [
            *combo,
            *FAST,
            f"data.reference={osmfish_small}",
            f"run_dir={tmp_path / 'run'}",
            "trainer.max_epochs=2",
            "model.warmup_epochs=1",
            "data.batch_size=128",
        ]
    )
    assert (run_dir / "model.ckpt").exists() and (run_dir / "config.yaml").exists()
    emb = ad.read_h5ad(run_dir / "embedding.h5ad")
    latent = int(next((c.split("=")[1] for c in combo if "latent_dim" in c), 16))
    source = ad.read_h5ad(osmfish_small)
    expected = int((np.asarray(source.X.sum(axis=1)).ravel() > 0).sum())  # empty cells dropped
    assert expected < 1200 and emb.shape == (expected, latent)
    assert np.isfinite(emb.X).all()
    assert set(emb.obs["split"]) == {"train", "val"}
    model = DPVAE.load_from_checkpoint(run_dir / "model.ckpt", map_location="cpu")
    # after the warm-up the scale was re-initialised from the data (not left at its init of 1.0)
    if "model.regularizer=none" not in combo:
        assert bool(model.scale_initialised)
        assert model.scale_value() != pytest.approx(1.0, abs=1e-6)


def test_checkpoint_round_trip_and_resume(
    osmfish_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*FAST, "logger=none", f"data.reference={osmfish_small}", f"run_dir={tmp_path}"]
    run_train([*args, "trainer.max_epochs=1"])
    ckpt = torch.load(tmp_path / "model.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 0
    model = DPVAE.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu")
    emb = ad.read_h5ad(tmp_path / "embedding.h5ad")
    dm = ReferenceDataModule(osmfish_small)
    dm.setup()
    np.testing.assert_allclose(model.embed(dm.cells("all").raw), emb.X, rtol=1e-5, atol=1e-5)
    assert model.genes == list(emb.uns["dpvae"]["genes"])
    # a second run with a larger budget resumes from that checkpoint instead of starting again
    capsys.readouterr()
    run_train([*args, "trainer.max_epochs=2"])
    assert "resuming from" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "model.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * len(dm.train_dataloader())


def test_checkpoints_are_written_at_most_every_n_seconds(
    osmfish_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a monitor, model.ckpt is written when every_n_seconds have passed and at the last
    epoch's end; the last checkpoint is the one an every-epoch run writes (epoch, step, weights,
    loop state), so its resume and its 'finished' check are unchanged."""
    from dpvae.callbacks import RunCheckpoint

    writes: list[int] = []
    save = RunCheckpoint._save_checkpoint

    def counted(self: RunCheckpoint, trainer: L.Trainer, filepath: str) -> None:
        writes.append(trainer.current_epoch)
        save(self, trainer, filepath)

    monkeypatch.setattr(RunCheckpoint, "_save_checkpoint", counted)
    args = [*FAST, "logger=none", f"data.reference={osmfish_small}", "trainer.max_epochs=4"]
    args += ["model.warmup_epochs=1", "callbacks.early_stopping.monitor=null"]
    ckpts = {}
    for seconds, expected in (("0", [0, 1, 2, 3]), ("3600", [3])):
        writes.clear()
        run = run_train(
            [
                *args,
                f"run_dir={tmp_path / seconds}",
                f"callbacks.checkpoint.every_n_seconds={seconds}",
            ]
        )
        assert writes == expected
        ckpts[seconds] = torch.load(run / "model.ckpt", weights_only=True, map_location="cpu")
    every, throttled = ckpts["0"], ckpts["3600"]
    assert (throttled["epoch"], throttled["global_step"]) == (every["epoch"], every["global_step"])
    assert throttled["loops"]["fit_loop"] == every["loops"]["fit_loop"]
    for key, value in every["state_dict"].items():
        assert torch.equal(throttled["state_dict"][key], value), key


def test_training_on_real_data_learns_distances(osmfish: ad.AnnData) -> None:
    """The embedded osmFISH (counts): the distance term takes hold on held-out cells.

    Measured: validation latent/spatial distance correlation MEASURED_BEFORE -> MEASURED_AFTER
    after 8 epochs (seed 0), the regularizer falling once it is on.
    """
    L.seed_everything(0, verbose=False)
    dm = ReferenceDataModule(osmfish, seed=0)
    dm.setup()
    assert dm.preprocessor.count_data and dm.preprocessor.normalize
    model = DPVAE(dm.n_genes, dm.preprocessor, warmup_epochs=2)
    val = dm.cells("val")

    def corr() -> float:
        return float(pearsonr(pdist(model.embed(val.raw)), pdist(val.coords))[0])

    class Record(L.Callback):
        reg: list[float] = []

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.reg.append(float(trainer.callback_metrics["train/reg_epoch"]))

    before = corr()
    record = Record()
    trainer = L.Trainer(
        max_epochs=8,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(model, dm)
    after = corr()
    print(f"MEASURE before={before:.3f} after={after:.3f} reg={record.reg}")
    assert before < 0.25
    assert after > 0.35
    assert record.reg[-1] < 0.9 * record.reg[2]  # falls once the term is on (epoch 2)


def test_pca_input_and_best_weights(osmfish_small: Path, tmp_path: Path) -> None:
    """PCA loadings live in the checkpoint; the best-epoch weights are what the run keeps."""
    run_dir = run_train(
        [
            *FAST,
            "logger=none",
            f"data.reference={osmfish_small}",
            f"run_dir={tmp_path}",
            "data.n_pcs=10",
            "trainer.max_epochs=3",
            "model.warmup_epochs=1",
            "callbacks.checkpoint.monitor=val/dist_pearson",
            "callbacks.checkpoint.mode=max",
            "callbacks.spatial.every_n_epochs=1",
        ]
    )
    model = DPVAE.load_from_checkpoint(run_dir / "model.ckpt", map_location="cpu")
    assert model.transform.pca.shape == (33, 10) and model.encoder.n_input == 10
    assert float(model.transform.pca.abs().sum()) > 0  # fitted loadings, not the zero init
    dm = ReferenceDataModule(osmfish_small, n_pcs=10)
    dm.setup()
    np.testing.assert_allclose(
        model.transform.pca.numpy(), dm.preprocessor.pca_components, atol=1e-5
    )
    # last.ckpt is the latest epoch whatever the monitor said (a resume starts there)
    assert torch.load(run_dir / "last.ckpt", weights_only=True, map_location="cpu")["epoch"] == 2
    # the checkpoint is the best epoch by val/dist_pearson; the embedding was written from it
    ckpt = torch.load(run_dir / "model.ckpt", weights_only=True, map_location="cpu")
    best = [c for c in ckpt["callbacks"].values() if "best_model_score" in c][0]
    assert best["monitor"] == "val/dist_pearson" and float(best["best_model_score"]) > -1
    emb = ad.read_h5ad(run_dir / "embedding.h5ad")
    np.testing.assert_allclose(model.embed(dm.cells("all").raw), emb.X, rtol=1e-4, atol=1e-4)


def test_best_weights_restores_the_best_epoch() -> None:
    from dpvae.callbacks import BestWeights

    net = torch.nn.Linear(2, 1)
    cb = BestWeights("val/score", "max")

    class T:  # the two attributes the callback reads
        sanity_checking = False
        current_epoch = 0
        callback_metrics: dict[str, torch.Tensor] = {}

    trainer = T()
    for epoch, (score, fill) in enumerate([(0.2, 1.0), (0.9, 2.0), (0.5, 3.0)]):
        with torch.no_grad():
            net.weight.fill_(fill)
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/score": torch.tensor(score)}
        cb.on_validation_end(trainer, net)  # type: ignore[arg-type]
    cb.on_fit_end(trainer, net)  # type: ignore[arg-type]
    assert cb.best_epoch == 1 and float(net.weight[0, 0]) == 2.0


def test_early_stopping_on_spatial_metric(osmfish_small: Path, tmp_path: Path) -> None:
    """A checkpoint monitoring val/dist_pearson makes the spatial callback run every epoch, so an
    every-epoch stopping check never lacks it; patience counts only after the warm-up (epoch 1
    here)."""
    run_dir = run_train(
        [
            *FAST,
            "logger=none",
            f"data.reference={osmfish_small}",
            f"run_dir={tmp_path}",
            "trainer.max_epochs=30",
            "model.warmup_epochs=2",
            "callbacks.early_stopping.monitor=val/dist_pearson",
            "callbacks.early_stopping.mode=max",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.every_n_epochs=1",
            "callbacks.checkpoint.monitor=val/dist_pearson",
            "callbacks.checkpoint.mode=max",
        ]
    )
    last = torch.load(run_dir / "last.ckpt", weights_only=True, map_location="cpu")
    best = torch.load(run_dir / "model.ckpt", weights_only=True, map_location="cpu")
    # epochs 0-1 are the warm-up; epoch 2 sets the first best, so the earliest stop is epoch 3
    assert 3 <= last["epoch"] < 29
    assert best["epoch"] <= last["epoch"]


def test_a_callback_set_to_null_is_dropped(osmfish_small: Path, tmp_path: Path) -> None:
    run_dir = run_train(
        [
            *FAST,
            "logger=none",
            f"data.reference={osmfish_small}",
            f"run_dir={tmp_path}",
            "trainer.max_epochs=1",
            "callbacks.report=null",
            "callbacks.spatial=null",
        ]
    )
    assert (run_dir / "model.ckpt").exists() and not (run_dir / "training.png").exists()
    ckpt = torch.load(run_dir / "model.ckpt", weights_only=True, map_location="cpu")
    assert not any("SpatialValidation" in k or "Report" in k for k in ckpt["callbacks"])


class LossSpy(L.Callback):
    """Every step's loss and batch size, and each epoch's logged train/loss_epoch beside their
    weighted mean (test_logged_terms_are_the_epoch_means_and_the_logger_steps)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []
        self.epochs: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.steps.append((float(outputs["loss"]), int(batch["raw"].shape[0])))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        losses, sizes = np.array(self.steps).T
        logged = float(trainer.callback_metrics["train/loss_epoch"])
        self.epochs.append((logged, float(np.average(losses, weights=sizes))))
        self.steps.clear()


def test_logged_terms_are_the_epoch_means_and_the_logger_steps(
    osmfish_small: Path, tmp_path: Path
) -> None:
    """The module sums its terms itself and hands the values to the trainer (no self.log): each
    epoch's train/loss_epoch is the batch-size-weighted mean of the steps' losses, visible to
    callbacks at their on_train_epoch_end; the logger gets step values every
    trainer.log_every_n_steps, and the rows self.log gave: one validation row an epoch with the
    spatial scores in it, the training epoch's row at its last step, each with its epoch."""
    import csv

    from dpvae import pipeline
    from dpvae.config import load_config

    cfg = load_config(
        [
            f"data.reference={osmfish_small}",
            "trainer.max_epochs=2",
            "model.warmup_epochs=1",
            "logger=csv",
            f"run_dir={tmp_path / 'run'}",
            "trainer.log_every_n_steps=2",
            "trainer.enable_progress_bar=false",
            "callbacks.spatial.every_n_epochs=1",
            "+callbacks.spy={_target_: tests.test_train.LossSpy}",
            *FAST,
        ]
    )
    done = pipeline.train(cfg, run_dir=tmp_path / "run")
    # (the class the configuration names, maybe a second import of this module)
    (spy,) = [cb for cb in done.trainer.callbacks if type(cb).__name__ == "LossSpy"]  # type: ignore[attr-defined]
    assert len(spy.epochs) == 2
    for logged, mean in spy.epochs:
        assert logged == pytest.approx(mean, rel=1e-5)
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert len(steps) >= 4 and all((s + 1) % 2 == 0 for s in steps)
    per_epoch = done.trainer.num_training_batches
    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    assert [(int(r["epoch"]), int(r["step"])) for r in epoch_rows] == [
        (e, (e + 1) * per_epoch - 1) for e in range(2)
    ]
    val_rows = [r for r in rows if r.get("val/loss")]
    assert [int(r["epoch"]) for r in val_rows] == [0, 1]
    assert all(r["val/dist_pearson"] and r["val/recon"] for r in val_rows)
    assert not any(r["val/dist_pearson"] for r in rows if not r.get("val/loss"))
    assert set(done.trainer.progress_bar_metrics) >= {"train/loss_bar", "val/loss_bar"}
    assert "val/dist_pearson" in done.trainer.callback_metrics


def test_accumulated_steps_are_written_once_and_validate_returns_its_scores(
    osmfish_small: Path, tmp_path: Path
) -> None:
    """With gradient accumulation the logger gets a step's values once, from the batch that
    steps (as Lightning writes them), and ``trainer.validate()`` returns and prints the
    validation means and the spatial scores (it reads what ``self.log`` gave it)."""
    import csv

    from dpvae import pipeline
    from dpvae.config import load_config

    cfg = load_config(
        [
            f"data.reference={osmfish_small}",
            "trainer.max_epochs=1",
            "model.warmup_epochs=0",
            "logger=csv",
            f"run_dir={tmp_path / 'run'}",
            "trainer.log_every_n_steps=1",
            "+trainer.accumulate_grad_batches=2",
            "trainer.enable_progress_bar=false",
            "callbacks.spatial.every_n_epochs=1",
            *FAST,
        ]
    )
    done = pipeline.train(cfg, run_dir=tmp_path / "run")
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    steps = [int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss_step")]
    assert steps and len(steps) == len(set(steps)) == done.trainer.global_step
    (results,) = done.trainer.validate(done.model, datamodule=done.data, verbose=False)
    assert {"val/loss", "val/recon", "val/dist_pearson"} <= set(results)
    assert results["val/loss"] == pytest.approx(float(done.trainer.callback_metrics["val/loss"]))
