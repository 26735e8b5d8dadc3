"""The composition root: everything a run needs, built from one configuration.

``dpvae-train`` / ``python train.py``, the Python API (:func:`dpvae.fit`) and the benchmark all
train through :func:`train`; nothing else instantiates a datamodule, model, callback, logger or
trainer. The configuration is the composed ``conf/train.yaml`` (:func:`dpvae.config.load_config`);
each part comes from its ``_target_``, so a user's own class slots in with a YAML file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from dpvae.config import instantiate, locate, to_plain
from dpvae.errors import ConfigError

if TYPE_CHECKING:
    import anndata as ad
    import lightning as L

    from dpvae.contracts import ReferenceData
    from dpvae.module import DPVAE
    from dpvae.network import Network, Parts


def configure_process(cfg: DictConfig) -> None:
    """Seed every generator (``cfg.seed``) and set torch's CPU threads (``cfg.threads``)."""
    import lightning as L
    import torch

    from dpvae.errors import check_process_options

    check_process_options(seed=cfg.seed, threads=cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))


def load_initial_model(path: str | Path) -> Network:
    """The trained model ``init_from`` names (a dpvae run's ``model.ckpt`` or its folder), on
    the CPU.

    Raises:
        DataError: no such file, or not a dpvae model checkpoint.
    """
    from dpvae.network import Network
    from dpvae.paths import find_checkpoint

    return Network.from_checkpoint(find_checkpoint(path, INIT_FROM_FIX), fix=INIT_FROM_FIX)


def source_reference(path: str | Path, init: Any) -> Any:
    """The reference cells of the run ``path`` (``init_from``) names: its ``embedding.h5ad``
    (:class:`dpvae.placement.ReferenceEmbedding`), or ``None`` when the run has none."""
    from dpvae.paths import find_checkpoint
    from dpvae.placement import EMBEDDING_FILE, ReferenceEmbedding

    embedding = find_checkpoint(path, INIT_FROM_FIX).parent / EMBEDDING_FILE
    if not embedding.exists():
        return None
    return ReferenceEmbedding.read(embedding, int(init.hparams["latent_dim"]))


#: what ``init_from`` takes, ending its errors
INIT_FROM_FIX = "; init_from takes a dpvae run folder or its model.ckpt"


def build_datamodule(
    cfg: DictConfig, reference: ad.AnnData | None = None, init: Parts | None = None
) -> Any:
    """Instantiate ``cfg.data`` and set it up (hygiene, gene selection, split, preprocessing fit).

    The datamodule is told whether the likelihood needs raw counts; ``reference`` replaces
    ``data.reference`` with an in-memory AnnData; with ``init`` (fine-tuning) the data are read
    on that model's genes and expression preprocessing. The result implements
    :class:`dpvae.contracts.ReferenceData`.
    """
    from dpvae.contracts import ReferenceData

    spec = init.hparams["likelihood"]["_target_"] if init is not None else None
    likelihood_cls = locate(spec or cfg.model.likelihood._target_)
    extra: dict[str, Any] = {"require_counts": bool(getattr(likelihood_cls, "requires_counts", 0))}
    if reference is not None:
        extra["reference"] = reference
    if init is not None:
        extra["fixed"] = init.preprocessor
    dm = instantiate(cfg.data, **extra)
    dm.setup("fit")
    if not isinstance(dm, ReferenceData):
        raise ConfigError(
            f"{cfg.data._target_} does not implement dpvae.contracts.ReferenceData "
            "(a preprocessor property and a cells(split) method)"
        )
    return dm


#: with init_from, these model settings come from the configuration (the fine-tuning schedule);
#: the architecture, the genes and the weights come from the trained model
TRAINING_SETTINGS = (
    "beta",
    "alpha",
    "warmup_epochs",
    "lr",
    "weight_decay",
    "distance_on",
    "optimizer",
)


def build_model(cfg: DictConfig, data: ReferenceData, init: Parts | None = None) -> DPVAE:
    """The model of ``cfg.model`` for the fitted preprocessing of ``data``; with ``init``, that
    trained model's architecture and weights in the data's coordinate frame, lambda re-fitted
    when the regularizer switches on."""
    from dpvae.module import DPVAE

    pre = data.preprocessor
    if init is None:
        return DPVAE(n_genes=len(pre.genes), preprocess=pre, **to_plain(cfg.model))
    hparams = dict(init.hparams)
    for key in TRAINING_SETTINGS:
        hparams[key] = cfg.model[key]
    hparams["preprocess"] = pre
    model = DPVAE(**hparams)
    model.load_state_dict(init.state_dict())
    model.scale_initialised.fill_(False)
    return model


def build_callbacks(cfg: DictConfig, write_files: bool = True) -> list[Any]:
    """The ``callbacks`` section (null entries skipped; checkpoints, and callbacks whose class
    says ``writes_files``, only when writing files)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = []
    for spec in (cfg.get("callbacks") or {}).values():
        if spec is None or not spec.get("_target_"):
            continue
        cls = locate(spec._target_)
        writes = isinstance(cls, type) and (
            issubclass(cls, ModelCheckpoint) or getattr(cls, "writes_files", False)
        )
        if writes and not write_files:
            continue
        out.append(instantiate(spec))
    return out


def build_logger(cfg: DictConfig) -> Any:
    """The logger of ``cfg.logger``, or ``False`` for none."""
    if cfg.get("logger") is None or not cfg.logger.get("_target_"):
        return False
    return instantiate(cfg.logger)


def build_trainer(
    cfg: DictConfig, callbacks: list[Any], logger: Any = False, run_dir: Path | None = None
) -> L.Trainer:
    """``lightning.Trainer`` from ``cfg.trainer``; without ``run_dir`` it writes nothing."""
    import sys

    import lightning as L

    kwargs = to_plain(cfg.trainer)
    verbose = bool(cfg.get("verbose", False))
    if kwargs.get("enable_progress_bar") is None:  # auto: a bar on a terminal, lines in a log
        kwargs["enable_progress_bar"] = verbose or sys.stderr.isatty()
    if kwargs.get("enable_model_summary") is None:
        kwargs["enable_model_summary"] = verbose
    if run_dir is None:
        kwargs.update(enable_progress_bar=False, enable_model_summary=False)
        kwargs.update(enable_checkpointing=False, logger=False)
    else:
        from lightning.pytorch.callbacks import ModelCheckpoint

        # no checkpoint callback configured: no checkpoints (not Lightning's default one)
        checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        kwargs.update(
            logger=logger, default_root_dir=str(run_dir), enable_checkpointing=checkpoints
        )
    if kwargs.get("profiler") is None and not kwargs.get("barebones"):
        from dpvae.profiler import NoProfiler

        kwargs["profiler"] = NoProfiler()  # a configured trainer.profiler wins
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kwargs, callbacks=callbacks)
    except (TypeError, ValueError, MisconfigurationException) as exc:  # Lightning's own checks
        raise ConfigError(f"bad trainer setting: {exc}".replace("\n", " ")) from exc


TERMS = ("loss", "recon", "kl", "reg", "lambda")


def check_monitors(callbacks: list[Any], data: Any) -> None:
    """Every metric a callback monitors is one the run logs (before any work).

    Raises:
        ConfigError: naming the monitor, the callback's key and the metrics that exist.
    """
    from dpvae.callbacks import SpatialValidation, WarmupEarlyStopping
    from dpvae.callbacks.spatial_validation import MIN_SCORED

    val = data.cells("val")
    has_val = len(val) > 0
    # the spatial scores need MIN_SCORED validation cells in a section (SpatialValidation)
    if val.section is None:
        scored = len(val) >= MIN_SCORED
    else:
        scored = any((val.section == name).sum() >= MIN_SCORED for name in val.sections)
    placed = scored and any(isinstance(cb, SpatialValidation) for cb in callbacks)
    val_terms = {f"val/{t}" for t in TERMS}
    spatial = {f"val/{m}" for m in SpatialValidation.METRICS}
    logged = {f"train/{t}{s}" for t in TERMS for s in ("_step", "_epoch")}
    logged |= val_terms if has_val else set()
    logged |= spatial if placed else set()
    for cb in callbacks:
        monitor = getattr(cb, "monitor", None)
        if not monitor or not getattr(cb, "enabled", True):
            continue
        stopping = isinstance(cb, WarmupEarlyStopping)
        if stopping and monitor in val_terms | spatial and monitor not in logged:
            # the stopping rule (on by default) needs validation cells (placed, for a spatial
            # score): without them the run keeps its fixed schedule, and says so
            cb.enabled = False
            notes = getattr(data, "notes", None)
            if isinstance(notes, list):
                why = (
                    "no validation cells"
                    if not has_val
                    else f"fewer than {MIN_SCORED} validation cells in every section"
                    if not scored
                    else "callbacks.spatial is off"
                )
                notes.append(
                    f"early stopping on {monitor} is off ({why}): the fixed schedule "
                    "(trainer.max_epochs) runs"
                )
            continue
        if monitor not in logged:
            why = ""
            if monitor.startswith("val/") and not has_val:
                why = " (data.val_fraction is 0: no validation cells)"
            elif monitor in spatial and not scored:
                why = (
                    f" (its spatial scores need {MIN_SCORED} validation cells in a section: "
                    "raise data.val_fraction)"
                )
            raise ConfigError(
                f"{type(cb).__name__} monitors {monitor!r}, which this run does not log{why}; "
                f"choose one of: {', '.join(sorted(logged))}"
            )


@dataclass
class Trained:
    """What :func:`train` returns: the model (best weights when monitored), its data, the trainer."""

    model: DPVAE
    data: Any
    trainer: L.Trainer
    #: fine-tuning's cross-validation (:mod:`dpvae.finetune`), when it ran
    cross_validation: Any = None
    #: the starting model's reference cells it scored the route through (:mod:`dpvae.anchors`)
    source: Any = None

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The run's own radius calibration (fine-tuning's cross-validation), or ``None``."""
        cv = self.cross_validation
        return None if cv is None else cv.calibration


def train(
    cfg: DictConfig,
    reference: ad.AnnData | None = None,
    run_dir: Path | None = None,
    resume_from: Path | None = None,
    on_start: Any = None,
    init: Parts | None = None,
    previous: dict[str, Any] | None = None,
    extra_callbacks: Sequence[Any] = (),
    source: Any = None,
) -> Trained:
    """Train the configured model.

    Args:
        cfg: the composed configuration.
        reference: an in-memory AnnData instead of ``data.reference``.
        run_dir: the run folder (checkpoints, logs); ``None`` trains in memory and writes nothing.
        resume_from: a checkpoint to continue from.
        init: a trained model to fine-tune (else ``cfg.init_from``'s checkpoint, if set); the
            schedule is then chosen by cross-validation over the data's cells when
            ``finetune.folds`` is 2 or more (:func:`dpvae.finetune.cross_validate`).
        previous: the run record of the checkpoint resumed (its cross-validation is reused).
        extra_callbacks: callbacks added to the configured ones.
        source: the starting model's reference cells (:class:`dpvae.placement.ReferenceEmbedding`;
            else those of ``cfg.init_from``'s run folder, when it has them): fine-tuning's
            cross-validation then also scores the route through them (:mod:`dpvae.anchors`).
        on_start: called as ``on_start(data, logger, data_fingerprint)`` on rank zero after setup,
            before training
            (the command line writes ``config.yaml`` and prints its first line there).
    """
    from dpvae.callbacks import RunState
    from dpvae.run_folder import fingerprint

    configure_process(cfg)
    if init is None and cfg.get("init_from"):
        init = load_initial_model(cfg.init_from)
        from dpvae.finetune import folds_of, route_of

        if source is None and route_of(cfg) != "anchors" and folds_of(cfg) >= 2:
            source = source_reference(cfg.init_from, init)
    data = build_datamodule(cfg, reference, init)
    cv = None
    fit_cfg = cfg
    if init is not None:
        from omegaconf import OmegaConf

        from dpvae.finetune import CrossValidation, cross_validate, folds_of

        done_before = (previous or {}).get("finetune")
        folds = folds_of(cfg)
        cv = CrossValidation.from_record(done_before) if done_before and folds >= 2 else None
        notes = getattr(data, "notes", None)
        if cv is None and _one_process(cfg):
            cv = cross_validate(cfg, data, init, source)
            configure_process(cfg)  # the final fit's generators as without cross-validation
        elif cv is None and folds >= 2 and isinstance(notes, list):
            notes.append("fine-tuning cross-validation skipped: it runs on one device only")
        if cv is not None:
            merged = OmegaConf.merge(cfg, {"trainer": {"max_epochs": cv.epochs}})
            assert isinstance(merged, DictConfig)
            fit_cfg = merged
            if isinstance(notes, list):
                notes.append(cv.summary())
    model = build_model(cfg, data, init)
    logger = build_logger(cfg) if run_dir is not None else False
    callbacks = [*build_callbacks(cfg, run_dir is not None), *extra_callbacks]
    for callback in callbacks:  # e.g. the modules a Freeze names exist
        check = getattr(callback, "check_model", None)
        if check is not None:
            check(model)
    data_fingerprint = fingerprint(data)  # once: the run's record and the resume check
    for callback in callbacks:
        if isinstance(callback, RunState):  # the run's record goes into every checkpoint
            callback.set_record(to_plain(cfg), data_fingerprint)
            if cv is not None:
                callback.record["finetune"] = cv.to_record()
    check_monitors(callbacks, data)
    trainer = build_trainer(fit_cfg, callbacks, logger, run_dir)
    from lightning.pytorch.utilities import rank_zero_only

    # before fit, ranks are known only from the launcher's environment (DDP re-runs the command)
    if on_start is not None and getattr(rank_zero_only, "rank", 0) == 0:
        on_start(data, logger, data_fingerprint)
    try:
        trainer.fit(
            model,
            datamodule=data,
            ckpt_path=str(resume_from) if resume_from else None,
            weights_only=True,  # checkpoints hold plain data: never unpickle code
        )
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its shutdown
            raise KeyboardInterrupt from None
        raise
    return Trained(model=model, data=data, trainer=trainer, cross_validation=cv, source=source)


def _one_process(cfg: DictConfig) -> bool:
    """The run trains in one process on one device (every rank of a distributed run would have
    to reach the same cross-validation; it is not attempted there)."""
    import os

    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    one = str(devices).strip() in ("1", "[0]") and str(nodes).strip() == "1"
    return one and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1
