"""User-facing errors.

Anything a user can cause (a bad path, a bad file, a bad config key) raises :class:`DPVAEError` with
one line that names the problem and the fix. Entry points (``train.py``, ``python -m dpvae.predict``)
print that line and exit with status 2 instead of showing a traceback.
"""

from __future__ import annotations

from typing import Any


class DPVAEError(Exception):
    """A problem with the user's input or configuration, explained in one line."""


class ConfigError(DPVAEError, ValueError):
    """An unknown key, an unknown option or a bad value in the configuration."""


class DataError(DPVAEError):
    """A data file that cannot be used as it is."""


class DPVAEWarning(UserWarning):
    """Doubtful input that dpvae goes on with; the commands print it as one ``dpvae: warning:``
    line."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok`` (a value's range check)."""
    if not ok:
        raise ConfigError(message)


def require_at_least(prefix: str, **limits: tuple[float, float]) -> None:
    """``require_at_least("data", n_genes=(n_genes, 0), ...)``: each value at least its bound."""
    for name, (value, low) in limits.items():
        require(value >= low, f"{prefix}.{name} must be at least {low:g}, got {value}")


#: the placement modes of prediction (``mode=``)
MODES = ("impute", "reconstruct")


def check_options(
    mode: str, k: int, n_iter: int, expression_weight: float, anchors: bool = False
) -> None:
    """The placement options' rules (one line each), checked before any work; ``anchors``:
    anchor cells are given (the route through the reference)."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    if anchors and (mode != "impute" or n_iter):
        raise ConfigError(
            "anchors= places cells by impute's neighbour mean; use it with mode=impute and n_iter=0"
        )
    from numbers import Integral, Real

    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, Integral) or n_iter < 0:
        raise ConfigError(f"n_iter must be an integer, 0 or more, got {n_iter!r}")
    if not isinstance(expression_weight, Real) or not expression_weight >= 0:
        raise ConfigError(f"expression_weight must be 0 or more, got {expression_weight!r}")


# The rules below are checked twice by design: by the training command before it imports torch
# and Lightning (a typo answered in a tenth of a second, not four), and by the classes that own
# them (the model, the datamodule) when they are built from Python. One function each keeps the
# two the same.


def check_process_options(*, seed: int, threads: int | None) -> None:
    """The run's ``seed`` and torch's CPU ``threads`` (null: torch's default)."""
    require(threads is None or threads >= 1, f"threads must be 1 or more (or null), got {threads}")
    require(seed >= 0, f"seed must be 0 or more, got {seed}")


#: AdamW's implementations (``model.optimizer``)
OPTIMIZERS = ("fused", "foreach", "loop")


def check_model_options(
    *,
    latent_dim: int,
    beta: float,
    alpha: float,
    warmup_epochs: int,
    lr: float,
    weight_decay: float,
    distance_on: str,
    optimizer: str,
) -> None:
    """The model's scalar options (``model.*``), one line each."""
    require(
        distance_on in ("mean", "sample"),
        f"model.distance_on must be mean or sample, got {distance_on!r}",
    )
    require(
        optimizer in OPTIMIZERS,
        f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}",
    )
    require(latent_dim >= 1, f"model.latent_dim must be at least 1, got {latent_dim}")
    for name, value in (
        ("beta", beta),
        ("alpha", alpha),
        ("lr", lr),
        ("weight_decay", weight_decay),
    ):
        require(value >= 0, f"model.{name} must be 0 or more, got {value}")
    require(warmup_epochs >= 0, f"model.warmup_epochs must be 0 or more, got {warmup_epochs}")


def check_data_options(
    *,
    val_fraction: float,
    batch_size: int,
    n_genes: int,
    n_pcs: int,
    neighbour_pcs: int,
    n_neighbours: int,
    min_cells: int,
    chunk_size: int,
    backed_threshold_mb: float,
    spatial_key: str,
    num_workers: int | str,
    backed: str | bool,
    far_pairs: int,
    near_weight: float,
) -> None:
    """The reference datamodule's scalar options (``data.*``), one line each."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if batch_size < 2:
        raise ConfigError(f"data.batch_size must be at least 2, got {batch_size}")
    require_at_least(
        "data",
        n_genes=(n_genes, 0),
        n_pcs=(n_pcs, 0),
        neighbour_pcs=(neighbour_pcs, 0),
        n_neighbours=(n_neighbours, 1),
        min_cells=(min_cells, 3),
        chunk_size=(chunk_size, 1),
        backed_threshold_mb=(backed_threshold_mb, 0),
    )
    require(bool(spatial_key), "data.spatial_key must name an obsm key, e.g. spatial")
    if num_workers != "auto" and (isinstance(num_workers, bool) or not str(num_workers).isdigit()):
        raise ConfigError(f"data.num_workers must be auto or an integer >= 0, got {num_workers!r}")
    if backed not in ("auto", True, False):
        raise ConfigError(f"data.backed must be auto, true or false, got {backed!r}")
    check_pair_options(far_pairs, near_weight)


def check_pair_options(far_pairs: int, near_weight: float) -> None:
    """Fail with one line on a bad ``data.far_pairs`` / ``data.near_weight``."""
    if isinstance(far_pairs, bool) or not isinstance(far_pairs, int) or far_pairs < 0:
        raise ConfigError(
            f"data.far_pairs must be an integer >= 0 (0: every other in-batch pair), got "
            f"{far_pairs!r}"
        )
    if not 0.0 < near_weight < 1.0:
        raise ConfigError(f"data.near_weight must be in (0, 1), got {near_weight!r}")


# The parts' and callbacks' rules: keyword arguments not given are not checked (their defaults
# here pass), so the training command can check what the configuration sets and each owner
# what it was given.

#: the hidden layers' normalisations and activations of :func:`dpvae.nn.mlp.mlp` (torch's class names)
NORMS = ("batch", "layer", "none")
ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "elu": "ELU", "silu": "SiLU", "tanh": "Tanh"}


def check_mlp_options(
    *,
    hidden: Any = (),
    dropout: float = 0.0,
    norm: str = "batch",
    activation: str = "relu",
    input_dropout: float = 0.0,
    logvar_clamp: float = 1.0,
) -> None:
    """The MLP encoder's and decoder's options (``model.encoder.*``, ``model.decoder.*``)."""
    if norm not in NORMS:
        raise ConfigError(f"unknown norm '{norm}'; choose one of: {', '.join(NORMS)}")
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation '{activation}'; choose one of: {', '.join(sorted(ACTIVATIONS))}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if any(int(h) <= 0 for h in hidden):
        raise ConfigError(f"hidden layer widths must be positive, got {list(hidden)}")
    require(0.0 <= input_dropout < 1.0, f"input_dropout must be in [0, 1), got {input_dropout}")
    require(logvar_clamp > 0, f"logvar_clamp must be positive, got {logvar_clamp}")


def check_scale_options(
    *,
    init_scale: float = 1.0,
    min_scale: float = 1e-3,
    max_scale: float = 1e3,
    relative: float = 0.0,
) -> None:
    """A learned-scale regularizer's options (``model.regularizer.*``)."""
    if not 0 < min_scale <= init_scale <= max_scale:
        raise ConfigError(
            "the regularizer's scales need 0 < min_scale <= init_scale <= max_scale, got "
            f"min_scale={min_scale}, init_scale={init_scale}, max_scale={max_scale}; fix "
            "model.regularizer.min_scale, init_scale or max_scale"
        )
    if not 0.0 <= relative <= 1.0:
        raise ConfigError(f"model.regularizer.relative must be in [0, 1], got {relative}")


def check_mode(key: str, mode: str) -> None:
    """``mode`` of a monitor (``callbacks.KEY.mode``): min or max."""
    require(mode in ("min", "max"), f"callbacks.{key}.mode must be min or max, got {mode!r}")


def check_checkpoint_options(
    *, every_n_seconds: float = 0.0, mode: str = "min", every_n_epochs: int = 1
) -> None:
    """``callbacks.checkpoint.*``."""
    require(
        every_n_seconds >= 0,
        f"callbacks.checkpoint.every_n_seconds must be 0 or more, got {every_n_seconds}",
    )
    require(
        isinstance(every_n_epochs, int) and every_n_epochs >= 1,
        f"callbacks.checkpoint.every_n_epochs must be a whole number, 1 or more, got "
        f"{every_n_epochs!r}",
    )
    check_mode("checkpoint", mode)


def check_best_options(*, mode: str = "max") -> None:
    """``callbacks.best.*``."""
    check_mode("best", mode)


#: how fine-tuning's cells place the rest of their section (``finetune.route``)
FINETUNE_ROUTES = ("auto", "anchors", "through")


def check_finetune_options(*, route: str = "auto", folds: int = 0, every_n_epochs: int = 1) -> None:
    """``finetune.*``."""
    require(
        route in FINETUNE_ROUTES,
        f"finetune.route must be one of {', '.join(FINETUNE_ROUTES)}, got {route!r}",
    )
    require_at_least("finetune", folds=(folds, 0), every_n_epochs=(every_n_epochs, 1))


def check_stopping_options(
    *, every_n_epochs: int = 1, patience: int = 1, mode: str = "min"
) -> None:
    """``callbacks.early_stopping.*``."""
    check_mode("early_stopping", mode)
    require_at_least(
        "callbacks.early_stopping", every_n_epochs=(every_n_epochs, 1), patience=(patience, 1)
    )


def check_spatial_options(
    *,
    every_n_epochs: int = 1,
    k: int = 1,
    max_reference: int = 1,
    max_query: int = 1,
    n_iter: int = 0,
    expression_weight: float = 0.0,
) -> None:
    """``callbacks.spatial.*``."""
    require_at_least(
        "callbacks.spatial",
        every_n_epochs=(every_n_epochs, 1),
        k=(k, 1),
        max_reference=(max_reference, 1),
        max_query=(max_query, 1),
        n_iter=(n_iter, 0),
        expression_weight=(expression_weight, 0),
    )
