"""Datasets embedded in the package (see README.md in this folder for provenance and licence)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: Embedded datasets, by the short name accepted wherever a data path is expected.
EMBEDDED: dict[str, str] = {
    "osmfish": "osmfish_mouse_sscortex.h5ad",
}


def embedded_path(name: str) -> Path:
    """Path of the embedded dataset called ``name`` (see :data:`EMBEDDED`)."""
    return _HERE / EMBEDDED[name]
