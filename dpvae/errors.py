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
