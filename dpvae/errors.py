"""User-facing errors.

Anything a user can cause (a bad path, a bad file, a bad config key) raises :class:`DPVAEError` with
one line that names the problem and the fix. Entry points (``train.py``, ``python -m dpvae.predict``)
print that line and exit with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class DPVAEError(Exception):
    """A problem with the user's input or configuration, explained in one line."""


class ConfigError(DPVAEError):
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


def check_options(mode: str, k: int, n_iter: int, expression_weight: float) -> None:
    """The placement options' rules (one line each), checked before any work."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
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
