"""Where a user's data argument points: embedded dataset names, paths, folders, globs and lists.

Pure path logic (no anndata, no torch), so the commands can refuse a missing file before their
heavy imports; :mod:`dpvae.io` reads what these name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpvae.data import EMBEDDED, embedded_path
from dpvae.errors import DataError


def resolve_path(path: str | Path) -> Path:
    """Turn a user's data argument into a file path: an embedded dataset name or a real path."""
    text = str(path)
    if text in EMBEDDED:
        return embedded_path(text)
    return Path(text).expanduser()


def _glob_chars(text: str) -> bool:
    return any(c in text for c in "*?[")


def resolve_references(reference: Any) -> list[tuple[str, Any]]:
    """A reference argument as ``(section name, path or AnnData)`` pairs, in order.

    ``reference``: an AnnData, a path or embedded dataset name, a folder (its ``*.h5ad`` files,
    sorted by name), a glob pattern, or a list of any of these. Section names are the file names
    without ``.h5ad`` (made unique with ``-1``, ``-2`` ...; ``section0`` ... for AnnData objects).

    Raises:
        DataError: a listed file does not exist (named), the same file is listed twice, a folder or
            pattern matches no ``.h5ad`` file, or the list is empty.
    """
    items = list(reference) if isinstance(reference, list | tuple) else [reference]
    if not hasattr(reference, "obs_names") and not items:
        raise DataError("data.reference is an empty list; give at least one .h5ad file")
    found: list[tuple[str, Any]] = []
    for pos, item in enumerate(items):
        if hasattr(item, "obs_names"):
            found.append((f"section{pos}", item))
            continue
        text = str(item)
        p = resolve_path(text)
        if text not in EMBEDDED and _glob_chars(text) and not p.exists():
            matches = sorted(Path(m) for m in __import__("glob").glob(str(p)))
            matches = [m for m in matches if m.suffix == ".h5ad" and m.is_file()]
            if not matches:
                raise DataError(f"{text}: the pattern matches no .h5ad file")
            found += [(m.name.removesuffix(".h5ad"), m) for m in matches]
        elif p.is_dir():
            matches = sorted(m for m in p.glob("*.h5ad") if m.is_file())
            if not matches:
                raise DataError(
                    f"{p}: is a folder with no .h5ad file in it; give an .h5ad file, a folder of "
                    "them or a list [a.h5ad,b.h5ad]"
                )
            found += [(m.name.removesuffix(".h5ad"), m) for m in matches]
        else:
            if len(items) > 1 and not p.exists():
                raise DataError(
                    f"{p}: no such file (item {pos + 1} of data.reference's {len(items)}); "
                    "fix the path or drop it from the list"
                )
            found.append((p.name.removesuffix(".h5ad") if text not in EMBEDDED else text, p))
    given = {name for name, _ in found}  # a suffixed name never takes one given as it is
    taken: set[str] = set()
    paths: dict[Path, str] = {}
    out = []
    for name, source in found:
        if isinstance(source, Path) and source.exists():
            real = source.resolve()
            if real in paths:
                raise DataError(
                    f"{source}: listed twice in data.reference (as {paths[real]!r} and again); "
                    "give each section once"
                )
            paths[real] = name
        if name in taken:  # a repeated name gets the first free suffix: a, a-1, a-2 ...
            base, i = name, 1
            while f"{base}-{i}" in taken or f"{base}-{i}" in given:
                i += 1
            name = f"{base}-{i}"
        taken.add(name)
        out.append((name, source))
    return out


def check_exists(path: str | Path) -> Path:
    """The file behind ``path`` (see :func:`resolve_path`), checked to exist and not be a folder.

    Raises:
        DataError: the file does not exist or is a folder.
    """
    p = resolve_path(path)
    if not p.exists():
        hint = f" (embedded datasets: {', '.join(sorted(EMBEDDED))})"
        raise DataError(f"{p}: no such file; give the path of an .h5ad file{hint}")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not an .h5ad file; give the path of the file itself")
    return p


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """``folder`` (made later if it does not exist), checked to be one that can be written: the
    folder itself, or else its nearest existing parent, is a writable folder.

    Raises:
        DataError: ``folder`` or a parent is a file, or the place is not writable.
    """
    p = Path(str(folder)).expanduser().absolute()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{what}: {existing} is a file, not a folder; choose another path")
    import tempfile

    try:  # permissions alone do not tell (a read-only mount, /proc, root's access)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise DataError(
            f"{what}: cannot write in {existing} ({exc.strerror or exc}); choose a folder you "
            "can write"
        ) from exc
    return p


#: a run folder's model file (callbacks.checkpoint writes it)
CHECKPOINT_FILE = "model.ckpt"
#: what a model to load takes (:func:`dpvae.load`, ``checkpoint=``), ending its errors
LOAD_FIX = f"; give a run folder or its {CHECKPOINT_FILE}"


def find_checkpoint(path: str | Path, fix: str) -> Path:
    """The model file ``path`` names: a run folder's ``model.ckpt`` or the file itself.

    Raises:
        DataError: no such file (``fix`` ends the message: what the option takes).
    """
    p = Path(str(path)).expanduser()
    ckpt = p / CHECKPOINT_FILE if p.is_dir() else p
    if not ckpt.is_file():
        raise DataError(f"{ckpt}: no such checkpoint{fix}")
    return ckpt
