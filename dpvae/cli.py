"""The command lines: one parser for every command, ``--help`` from the YAML defaults.

Every command (``dpvae-train`` / ``python train.py``, ``dpvae-predict`` / ``python -m
dpvae.predict``, and the checkout's benchmarks) takes ``key=value`` arguments composed onto a YAML
of defaults by :func:`dpvae.config.load_config` (typed and strict), answers ``--help`` with every
key and its default before anything heavy is imported, and turns a user's mistake into one line
``dpvae: error: ...`` and exit status 2.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from dpvae.errors import DPVAEError, require

HELP_FLAGS = ("-h", "--help", "help")


def help_text(
    prog: str, summary: str, conf_dir: Path | None, root_file: str, extra_keys: bool = True
) -> str:
    """Usage, ``summary``, the option groups and every key with its default and comment."""
    from dpvae.config import flat_defaults

    rows = flat_defaults(conf_dir, root_file)
    groups = [(k, v, c) for k, v, c in rows if c.startswith("option group:")]
    keys = [(k, v, c) for k, v, c in rows if not c.startswith("option group:")]
    width = max((len(f"{k}={_show(v)}") for k, v, _ in rows), default=0) + 2
    width = min(width, 44)
    lines = [f"usage: {prog} [KEY=VALUE ...]", "", summary.strip(), ""]
    if groups:
        lines.append("option groups (KEY=OPTION picks a YAML file; a path to a .yaml works too):")
        for key, value, comment in groups:
            lines.append(f"  {f'{key}={value}':<{width}} {comment.removeprefix('option group: ')}")
        lines.append("")
    lines.append("keys (KEY=VALUE; the default is shown, ??? = required):")
    for key, value, comment in keys:
        text = f"{key}={_show(value)}"
        lines.append(f"  {text:<{width}} {comment}".rstrip())
    if extra_keys:
        lines += ["", "+KEY=VALUE adds a key the YAML does not list (e.g. +trainer.KEY=...)."]
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def quiet_output(verbose: bool) -> None:
    """What a command shows: dpvae's own warnings as one ``dpvae: warning:`` line each; other
    libraries' warnings, Lightning's info lines and W&B's messages only with ``verbose``."""
    import logging
    import os

    from dpvae.errors import DPVAEWarning

    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, DPVAEWarning):
            print(f"dpvae: warning: {message}".replace("\n", " "), file=sys.stderr)
        elif verbose:
            shown(message, category, *args, **kwargs)

    warnings.simplefilter("default")
    warnings.showwarning = show
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def error(message: str) -> None:
    """Print a user error as one line on stderr."""
    print(f"dpvae: error: {message}".replace("\n", " "), file=sys.stderr)


def run_command(
    argv: Sequence[str] | None,
    *,
    prog: str,
    summary: str,
    conf_dir: Path | None = None,
    root_file: str,
    work: Callable[[DictConfig], int | None],
    interrupted: str = "interrupted",
    extra_keys: bool = True,
) -> int:
    """Parse ``argv`` onto ``root_file``'s defaults and run ``work(cfg)``; return the exit status.

    ``--help`` prints :func:`help_text` (0); a :class:`~dpvae.errors.DPVAEError` prints one line
    (2); Ctrl-C prints ``interrupted`` (130).
    """
    from dpvae.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if any(a in HELP_FLAGS for a in args):
            try:
                print(help_text(prog, summary, conf_dir, root_file, extra_keys), flush=True)
            except BrokenPipeError:  # --help | head
                import os

                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        added = [a for a in args if a.startswith("+")]
        if added and not extra_keys:
            from dpvae.errors import ConfigError

            raise ConfigError(f"{prog} takes no added keys ({added[0]}); --help lists its keys")
        cfg = load_config(args, conf_dir=conf_dir, root_file=root_file)
        if argv is not None:  # called from Python (tests): leave warnings and logs alone
            return int(work(cfg) or 0)
        with warnings.catch_warnings():
            quiet_output(bool(cfg.get("verbose", False)))
            return int(work(cfg) or 0)
    except DPVAEError as exc:
        error(str(exc))
        return 2
    except KeyboardInterrupt:
        print(f"dpvae: {interrupted}", file=sys.stderr)
        return 130


def command(
    prog: str,
    summary: str,
    conf_dir: Path,
    root_file: str,
    work: Callable[[DictConfig], int | None],
) -> Callable[[Sequence[str] | None], int]:
    """A ``main(argv=None)`` for a command of its own YAML (the benchmarks' commands)."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(
            argv,
            prog=prog,
            summary=summary,
            conf_dir=conf_dir,
            root_file=root_file,
            work=work,
            extra_keys=False,
        )

    return main


def say_started(what: str) -> None:
    """The command's first line (stdout, at once, before the heavy imports): what it is doing.

    Once per job: under DDP only rank zero says it. Diagnostics and errors go to stderr.
    """
    import os

    if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
        print(f"dpvae: {what}", flush=True)


# ---------------------------------------------------------------------------------- train
TRAIN_SUMMARY = """
Train a dp-VAE on a reference section (.h5ad with coordinates in obsm['spatial']); with no
arguments, on the embedded osmFISH dataset. Writes run_dir/model.ckpt, config.yaml, embedding.h5ad
and the logs; the same command again resumes an interrupted run.
"""


#: the configuration's targets whose options the training command checks before its imports, by
#: the rule functions their classes call when built (a user's own class checks its options then)
PRECHECKS = {
    "datamodules.ReferenceDataModule": "check_data_options",
    "nn.MLPEncoder": "check_mlp_options",
    "nn.MLPDecoder": "check_mlp_options",
    "regularizers.DPRegularizer": "check_scale_options",
    "regularizers.StressRegularizer": "check_scale_options",
    "callbacks.RunCheckpoint": "check_checkpoint_options",
    "callbacks.BestWeights": "check_best_options",
    "callbacks.WarmupEarlyStopping": "check_stopping_options",
    "callbacks.SpatialValidation": "check_spatial_options",
}
#: Lightning's integer trainer options and their least values when set (Lightning checks them
#: too, but only once torch and Lightning are imported: four seconds for a typo)
TRAINER_AT_LEAST = {
    "max_epochs": -1,
    "max_steps": -1,
    "log_every_n_steps": 0,
    "num_nodes": 1,
    "check_val_every_n_epoch": 1,
}


def _target_name(node: dict[str, Any]) -> str:
    """A configuration mapping's ``_target_`` without the ``dpvae.`` prefix (the checkout's
    ``callbacks.X`` and the package's ``dpvae.callbacks.X`` are one class)."""
    return str(node.get("_target_") or "").removeprefix("dpvae.")


def _check_section(check: Callable[..., None], section: Any) -> None:
    """``check(**the section's values of check's keyword arguments)``; a required one that the
    section lacks skips the check."""
    import inspect

    given = {}
    for name, parameter in inspect.signature(check).parameters.items():
        if name in section and section[name] is not None:
            given[name] = section[name]
        elif parameter.default is inspect.Parameter.empty:
            return
    check(**given)


def _check_targets(node: Any, path: str = "") -> None:
    """Every mapping of the configuration whose ``_target_`` :data:`PRECHECKS` names, checked;
    a message that does not name its key gets the mapping's path in front (``model.encoder:``)."""
    from dpvae import errors

    if not isinstance(node, dict):
        return
    target = _target_name(node)
    if target in PRECHECKS:
        try:
            _check_section(getattr(errors, PRECHECKS[target]), node)
        except errors.ConfigError as exc:
            if str(exc).startswith(f"{path}."):
                raise
            raise errors.ConfigError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:  # a value of the wrong type in an added section
            raise errors.ConfigError(f"{path}: a value of the wrong type ({exc})") from None
    for key, value in node.items():
        _check_targets(value, f"{path}.{key}" if path else str(key))


def _check_train(cfg: DictConfig) -> None:
    """The training options, checked before torch, Lightning and anndata are imported: the
    model's values, those of every part, datamodule and callback :data:`PRECHECKS` names, the
    reference files, ``init_from``, the seed and Lightning's integer options. The owners check
    their rules again when built (:func:`dpvae.network.model_hparams`, the datamodule, the
    parts, the callbacks), with the same functions."""
    from dpvae.config import to_plain
    from dpvae.errors import (
        check_finetune_options,
        check_model_options,
        check_process_options,
        require_at_least,
    )
    from dpvae.paths import (
        check_exists,
        check_writable_folder,
        find_checkpoint,
        resolve_references,
    )

    check_process_options(seed=cfg.seed, threads=cfg.threads)
    check_writable_folder(cfg.run_dir, f"run_dir={cfg.run_dir}")
    require(
        cfg.embedding.batch_size >= 1,
        f"embedding.batch_size must be at least 1, got {cfg.embedding.batch_size}",
    )
    plain = to_plain(cfg)
    _check_section(check_model_options, plain["model"])
    _check_targets(plain)
    data = plain["data"]
    if _target_name(data) == "datamodules.ReferenceDataModule":
        for _, source in resolve_references(data.get("reference")):
            check_exists(source)
    trainer = plain["trainer"]
    set_values = {
        k: (trainer[k], least)
        for k, least in TRAINER_AT_LEAST.items()
        if trainer.get(k) is not None
    }
    require_at_least("trainer", **set_values)
    if cfg.get("init_from"):
        from dpvae.pipeline import INIT_FROM_FIX

        find_checkpoint(cfg.init_from, INIT_FROM_FIX)
    finetune = plain.get("finetune") or {}
    check_finetune_options(
        route=str(finetune.get("route") or "auto"),
        **{
            key: int(finetune[key])
            for key in ("folds", "every_n_epochs")
            if finetune.get(key) is not None
        },
    )


def train_work(cfg: DictConfig) -> int:
    """Train from a composed configuration, writing the run folder.

    Everything that can refuse the run (a busy folder, a resume whose model or data differ, a
    bad value) does so before the first file is written.
    """
    import warnings

    _check_train(cfg)
    reference = cfg.data.reference
    if not isinstance(reference, str):
        reference = ", ".join(str(r) for r in reference)
    say_started(f"training on {reference} -> {cfg.run_dir}")
    from omegaconf import OmegaConf  # torch, Lightning and anndata: after the first line

    from dpvae import pipeline
    from dpvae.config import to_plain
    from dpvae.errors import ConfigError, DPVAEWarning
    from dpvae.io import write_text_atomic
    from dpvae.placement import EMBEDDING_FILE, embed_reference
    from dpvae.run_folder import (
        CHECKPOINT_FILE,
        CONFIG_FILE,
        FIGURE_FILE,
        LAST_FILE,
        THROUGH_FILE,
        RunLock,
        check_data,
        check_resume,
        checkpoint_to_resume,
        trim_csv_logs,
    )

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    plain = to_plain(cfg)
    from lightning.pytorch.utilities import rank_zero_only

    lock = RunLock(run_dir)
    if getattr(rank_zero_only, "rank", 0) == 0:  # DDP's other ranks run under rank 0's lock
        lock.check()
    resume = checkpoint_to_resume(run_dir, bool(cfg.resume))
    resume_from = resume.path if resume else None
    if resume_from is None and (run_dir / EMBEDDING_FILE).exists():
        raise ConfigError(
            f"{run_dir} holds an {EMBEDDING_FILE} but no checkpoint to resume; choose another "
            "run_dir (or move that run away)"
        )
    record = resume.record if resume else {}
    check_resume(record, plain, run_dir)
    if resume and cfg.trainer.max_epochs not in (None, -1):
        done_epochs = resume.epoch + 1
        same_data = record.get("config", {}).get("data") == plain.get("data")
        from dpvae.finetune import folds_of

        chosen = cfg.trainer.max_epochs
        by_cv = folds_of(cfg) >= 2 and "epochs" in record.get("finetune", {})
        if by_cv:
            chosen = min(chosen, record["finetune"]["epochs"])  # by its cross-validation
        ended = done_epochs >= chosen or resume.stopped_early
        finished = ended and ((run_dir / EMBEDDING_FILE).exists() or not cfg.embedding.write)
        if finished and same_data:
            trained = min(done_epochs, chosen)
            if resume.stopped_early and done_epochs < chosen:
                how = "the stopping rule ended it"
            elif by_cv:
                how = "fine-tuning's cross-validation chose its epochs"
            else:  # the default run_dir names the configuration, max_epochs included
                how = (
                    f"to train it longer, give run_dir={run_dir} and a trainer.max_epochs above "
                    f"{trained}"
                )
            print(
                f"dpvae: {run_dir} already holds a finished run ({trained} "
                f"epoch{'' if trained == 1 else 's'}); nothing to do ({how}; another run_dir "
                "starts anew)",
                file=sys.stderr,
            )
            return 0
    warmup, epochs = cfg.model.warmup_epochs, cfg.trainer.max_epochs
    if epochs not in (None, -1) and epochs <= warmup and cfg.model.alpha > 0:
        warnings.warn(
            f"trainer.max_epochs={epochs} ends before the distance regularizer switches on "
            f"(model.warmup_epochs={warmup}): this trains a plain VAE",
            DPVAEWarning,
            stacklevel=2,
        )

    def on_start(data: Any, logger: Any, data_fingerprint: str) -> None:
        check_data(record, data_fingerprint, run_dir, plain)
        lock.acquire()
        if resume:
            trim_csv_logs(run_dir, resume.epoch)
        write_text_atomic(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
        if logger:
            logger.log_hyperparams(plain)
        where = f"resuming from {resume_from}" if resume_from else "training"
        for note in getattr(data, "notes", ()):
            print(f"dpvae: {note}", file=sys.stderr)
        n_train, n_val = len(data.cells("train")), len(data.cells("val"))
        print(
            f"dpvae: {where}: {len(data.preprocessor.genes)} genes, {n_train} train / "
            f"{n_val} validation cells -> {run_dir}",
            file=sys.stderr,
        )

    try:
        done = pipeline.train(
            cfg, run_dir=run_dir, resume_from=resume_from, on_start=on_start, previous=record
        )
        if done.trainer.is_global_zero and cfg.embedding.write:
            model = done.model.cpu()
            embedding = embed_reference(
                model, done.data, cfg.embedding.batch_size, calibration=done.calibration
            )
            embedding.write(run_dir / EMBEDDING_FILE)
        cv = done.cross_validation
        through = cv is not None and cv.route == "through" and done.source is not None
        if done.trainer.is_global_zero and through:
            # the query is placed through the starting run's cells: a copy travels with it
            done.source.write(run_dir / THROUGH_FILE)
        if done.trainer.is_global_zero and cfg.embedding.write:
            names = (
                CHECKPOINT_FILE,
                LAST_FILE,
                CONFIG_FILE,
                EMBEDDING_FILE,
                THROUGH_FILE,
                FIGURE_FILE,
            )
            written = [n for n in names if (run_dir / n).exists()]
            print(f"dpvae: wrote {run_dir}: {', '.join(written)}", file=sys.stderr)
            if (run_dir / "wandb").is_dir() and "Wandb" in str(cfg.logger.get("_target_") or ""):
                print(
                    f"dpvae: W&B run saved offline; upload it with: wandb sync "
                    f"{run_dir / 'wandb'}/offline-run-*",
                    file=sys.stderr,
                )
    finally:
        lock.release()
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``dpvae-train`` and ``python train.py``."""
    import logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    return run_command(
        argv,
        prog="python train.py" if Path(sys.argv[0]).name == "train.py" else "dpvae-train",
        summary=TRAIN_SUMMARY,
        root_file="train.yaml",
        work=train_work,
        interrupted="interrupted; run the same command again to resume",
    )


# -------------------------------------------------------------------------------- predict
PREDICT_SUMMARY = """
Place a query's cells with a trained model: mode=impute puts each cell into the reference's frame
against the run's reference cells (or reference=REF.h5ad); mode=reconstruct solves the query's own
layout up to rigid motion. The output is the query plus obsm['spatial_dpvae'] (coordinates),
obsm['X_dpvae'] (latent codes) and uns['dpvae']; scores are printed when the query has true
coordinates. The query file is never modified.
"""


def _check_predict(cfg: DictConfig) -> tuple[Path, Path]:
    from dpvae.errors import ConfigError, check_options
    from dpvae.paths import LOAD_FIX, check_exists, check_writable_folder, find_checkpoint

    query, output = Path(cfg.query).expanduser(), Path(cfg.output).expanduser()
    check_writable_folder(output.parent, f"output={cfg.output}")
    if output.is_dir():
        raise ConfigError(f"output={cfg.output} is a folder; give the .h5ad file to write")
    if output.resolve() == query.resolve():
        raise ConfigError("output must differ from query; the query file is never modified")
    if cfg.plot and output.suffix == ".png":
        raise ConfigError(
            f"output={output} would be overwritten by its figure; give an .h5ad output"
        )
    for path in (output, output.with_suffix(".png")) if cfg.plot else (output,):
        if path.exists() and not cfg.overwrite:
            raise ConfigError(f"{path} exists; choose another output or add overwrite=true")
    check_options(cfg.mode, cfg.k, cfg.n_iter, cfg.expression_weight, bool(cfg.get("anchors")))
    find_checkpoint(cfg.checkpoint, LOAD_FIX)  # before torch is imported: a typo answered at once
    check_exists(query)
    if cfg.get("anchors"):
        check_exists(Path(cfg.anchors).expanduser())
    return query, output


#: Query files above this size are read a row block at a time from disk (backed) and the output
#: is written by copying the query file and adding the prediction to the copy, so memory does
#: not grow with the query's matrix; smaller queries are read into memory.
STREAM_QUERY_MB = 1024.0


def predict_work(cfg: DictConfig) -> int:
    """Predict from a composed ``predict.yaml`` configuration."""
    import warnings

    query_path, output = _check_predict(cfg)
    say_started(f"placing {query_path} with {cfg.checkpoint} -> {output}")
    from dpvae.api import load  # torch, Lightning and anndata: after the first line
    from dpvae.errors import DataError, DPVAEWarning
    from dpvae.io import read_h5ad, resolve_path, write_h5ad_atomic

    model = load(cfg.checkpoint)
    query = read_h5ad(query_path, backed="auto", backed_threshold_mb=STREAM_QUERY_MB)
    stream = bool(query.isbacked)
    from dpvae.placement import RADIUS_KEY

    radius_plot = cfg.plot == RADIUS_KEY and cfg.mode == "impute"
    if cfg.plot == RADIUS_KEY and not radius_plot:
        raise DataError(
            f"plot={RADIUS_KEY}: mode={cfg.mode} places cells in their own frame, with no "
            "radius; use mode=impute for it, or plot a gene or an obs column"
        )
    if (
        cfg.plot
        and not radius_plot
        and cfg.plot not in query.obs
        and cfg.plot not in query.var_names
    ):
        raise DataError(
            f"plot={cfg.plot}: neither an obs column nor a gene of the query (or {RADIUS_KEY}, "
            "each cell's 90% radius)"
        )
    options = dict(
        mode=cfg.mode,
        reference=cfg.reference,
        k=cfg.k,
        spatial_key=cfg.spatial_key,
        layer=cfg.layer,
        n_iter=cfg.n_iter,
        expression_weight=cfg.expression_weight,
        align_query=cfg.align_query,
        allow_missing_genes=cfg.allow_missing_genes,
        reference_section=cfg.reference_section,
        anchors=cfg.anchors,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if stream:
            pred = model._predict(query, **options)
        else:
            out = model.annotate(query, **options)
    for w in caught:
        if issubclass(w.category, DPVAEWarning):
            print(f"dpvae: warning: {w.message}", file=sys.stderr)
    if stream:
        n_cells = query.n_obs
        query.file.close()
        pred.write_beside(resolve_path(query_path), output)
        info = pred.info
        del pred
    else:
        n_cells = out.n_obs
        write_h5ad_atomic(out, output)
        info = out.uns["dpvae"]
    where = ""
    if info.get("reference_section") is not None:
        where = (
            f", reference section {info['reference_section']} of "
            f"{info.get('n_reference_sections', 1)}"
        )
    through = info.get("anchors")
    if through:
        where += (
            f", through the reference, {through['n_anchors']} anchors: held-out error "
            f"{through['held_out_mean_error']:.3g} (their units)"
        )
    radius = info.get("radius")
    if radius:
        where += (
            f"; 90% radius: median {radius['median_cell_spacings']:.2f} cell spacings "
            f"(obs['{radius['obs_key']}'])"
        )
    print(f"dpvae: wrote {output} ({n_cells} cells, mode={info['mode']}{where})")
    scores = info.get("scores")
    if scores:
        from dpvae.metrics import format_scores

        print("dpvae: scores against the query's true coordinates: " + format_scores(scores))
    if cfg.plot:
        from dpvae.plotting import plot_prediction

        color = cfg.plot
        if radius_plot and not radius:  # the warning above says why there is none
            print(
                f"dpvae: warning: plot={RADIUS_KEY}: no radius to shade the cells by; the "
                "figure shows the layouts unshaded",
                file=sys.stderr,
            )
            color = None
        shown = read_h5ad(output, backed=True) if stream else out
        png = plot_prediction(shown, color, output.with_suffix(".png"), cfg.spatial_key)
        print(f"dpvae: wrote {png}")
    return 0


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``dpvae-predict`` and ``python -m dpvae.predict``."""
    return run_command(
        argv,
        prog="dpvae-predict",
        summary=PREDICT_SUMMARY,
        root_file="predict.yaml",
        work=predict_work,
        extra_keys=False,
    )


def exit_now(code: int) -> NoReturn:
    """End a command's process with ``code``, its exit handlers run but its modules not torn down.

    After torch and Lightning, the interpreter's shutdown spends 1.3-1.5 s (on 2 cores) clearing
    modules from a process that is ending anyway: a third of a small run's command. The standard
    streams are flushed and the exit handlers run (W&B's run, logging, multiprocessing's
    children), then ``os._exit`` ends the process. Only the commands' entry points call it,
    after their work has returned; the Python API and the tests never do.
    """
    import atexit
    import os

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing left to say
                pass
        os._exit(code)


def train_entry() -> NoReturn:
    """The ``dpvae-train`` console script (:func:`train_main`, then :func:`exit_now`)."""
    exit_now(train_main())


def predict_entry() -> NoReturn:
    """The ``dpvae-predict`` console script (:func:`predict_main`, then :func:`exit_now`)."""
    exit_now(predict_main())
