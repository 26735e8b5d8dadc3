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
