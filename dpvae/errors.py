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
