"""Configuration on plain OmegaConf: ``key=value`` overrides, option groups, ``_target_`` objects.

Rules (the README shows them in use):

* ``conf/train.yaml`` is the root. A key whose dotted path is a folder under a config root
  (``model.regularizer`` -> ``conf/model/regularizer/``) names one YAML file of that folder; the file
  is loaded in its place. ``model.regularizer=stress`` on the command line selects another file; the
  value may also be the path of a YAML file anywhere.
* Any other ``key=value`` overrides a value (parsed as YAML: ``5``, ``1e-3``, ``true``, ``null``,
  ``[64,64]``). An unknown key fails at once, listing the keys that exist at that level;
  ``+key=value`` adds a key that the YAML does not list.
* Config roots are the folders in ``$DPVAE_CONFIG_PATH`` (``:``-separated, searched first) and then
  the project's ``conf/``. A user adds an option by dropping a YAML file into
  ``<their root>/model/regularizer/`` with nothing registered or edited.
* :func:`instantiate` builds an object from a mapping with ``_target_`` (``module.Class``) and its
  keyword arguments.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpvae.errors import ConfigError

ENV_CONFIG_PATH = "DPVAE_CONFIG_PATH"
ENV_RUN_STAMP = "DPVAE_RUN_STAMP"
ROOT_FILE = "train.yaml"


def default_conf_dir() -> Path:
    """The project's ``conf/`` folder (a checkout's top level, or the copy inside an installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / ROOT_FILE).exists():
            return candidate
    raise ConfigError(f"cannot find dpvae's conf/ folder next to {here}; reinstall dpvae")


def config_roots(conf_dir: Path | None = None) -> list[Path]:
    """Folders searched for option files: ``$DPVAE_CONFIG_PATH`` entries, then ``conf_dir``."""
    roots = [Path(p).expanduser() for p in os.environ.get(ENV_CONFIG_PATH, "").split(":") if p]
    roots.append(conf_dir or default_conf_dir())
    return roots


def _run_stamp() -> str:
    """A run name shared by every process of one run (DDP re-executes the script per rank)."""
    stamp = os.environ.get(ENV_RUN_STAMP)
    if not stamp:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        os.environ[ENV_RUN_STAMP] = stamp
    return stamp


if not OmegaConf.has_resolver("run_stamp"):
    _register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    _register("run_stamp", _run_stamp)


def _is_group(path: Sequence[str], roots: Sequence[Path]) -> bool:
    """A group is a folder holding option files (``model/`` only holds groups, so is none)."""
    return bool(path) and any(
        any(root.joinpath(*path).glob("*.yaml")) for root in roots if root.joinpath(*path).is_dir()
    )


def group_options(path: Sequence[str], roots: Sequence[Path]) -> list[str]:
    """Names of the options (YAML file stems) of the group at ``path``, over all roots."""
    names: set[str] = set()
    for root in roots:
        folder = root.joinpath(*path)
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style floats: ``1e-3`` and ``1.0e3`` are numbers, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _load_yaml(path: Path) -> Any:
    try:
        with open(path) as fh:
            return _parse_yaml(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})".replace("\n", " ")) from exc


def _load_option(path: Sequence[str], value: Any, roots: Sequence[Path]) -> Any:
    dotted = ".".join(path)
    if not isinstance(value, str):
        raise ConfigError(f"{dotted} selects an option file; give its name, not {value!r}")
    if value.endswith((".yaml", ".yml")) and Path(value).expanduser().is_file():
        return _load_yaml(Path(value).expanduser())
    for root in roots:
        candidate = root.joinpath(*path, f"{value}.yaml")
        if candidate.is_file():
            return _load_yaml(candidate)
    choices = ", ".join(group_options(path, roots))
    raise ConfigError(
        f"unknown option '{value}' for {dotted}; choose one of: {choices} (or a path to a .yaml file)"
    )


def _compose(node: Any, path: list[str], roots: Sequence[Path], selections: dict[str, Any]) -> Any:
    """Replace every group-selecting string in ``node`` by the option file it names."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        sub = [*path, str(key)]
        dotted = ".".join(sub)
        if dotted in selections:
            value = selections[dotted]
        if not isinstance(value, dict) and _is_group(sub, roots):
            value = _load_option(sub, value, roots)
        out[key] = _compose(value, sub, roots, selections)
    return out


def _parse_override(text: str) -> tuple[str, Any, bool]:
    if "=" not in text:
        raise ConfigError(f"expected key=value, got '{text}'; e.g. trainer.max_epochs=5")
    key, raw = text.split("=", 1)
    add = key.startswith("+")
    key = key.lstrip("+").strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad key in '{text}'; keys are dotted names like model.latent_dim")
    try:
        value = _parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value, add


def _set_value(cfg: dict[str, Any], key: str, value: Any, add: bool) -> None:
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if not isinstance(node, dict):
            where = ".".join(parts[:depth])
            raise ConfigError(f"cannot set {key}: {where} is a value, not a section")
        if part not in node:
            if add and last:
                node[part] = value
                return
            where = ".".join(parts[:depth]) or "the top level"
            valid = ", ".join(sorted(str(k) for k in node if not str(k).startswith("_"))) or "none"
            raise ConfigError(
                f"unknown key '{key}': {where} has no '{part}'; valid keys there: {valid} "
                f"(use +{key}=... to add a new one)"
            )
        if last:
            node[part] = value
            return
        node = node[part]


def load_config(overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """Compose ``train.yaml`` with option groups and ``key=value`` overrides; resolve it.

    Raises:
        ConfigError: a malformed override, an unknown key or option, or a bad interpolation.
    """
    roots = config_roots(conf_dir)
    base = None
    for root in reversed(roots):  # the project's root file unless a user root has its own
        if (root / ROOT_FILE).is_file():
            base = _load_yaml(root / ROOT_FILE)
    if not isinstance(base, dict):
        raise ConfigError(f"no {ROOT_FILE} found in {', '.join(map(str, roots))}")
    selections: dict[str, Any] = {}
    values: list[tuple[str, Any, bool]] = []
    for text in overrides:
        key, value, add = _parse_override(text)
        if _is_group(key.split("."), roots):
            selections[key] = value
        else:
            values.append((key, value, add))
    for key in selections:
        _set_value(base, key, selections[key], add=True)
    composed = _compose(base, [], roots, selections)
    for key, value, add in values:
        _set_value(composed, key, value, add)
    try:
        cfg = OmegaConf.create(composed)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config value: {exc}".replace("\n", " ")) from exc
    return cfg


def to_plain(cfg: Any) -> Any:
    """A resolved OmegaConf node as plain Python containers (safe for checkpoints and loggers)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def locate(target: str) -> Any:
    """Import ``package.module.Attribute`` and return the attribute."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"_target_ '{target}' must be a dotted path like package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import '{module_name}' for _target_ '{target}' ({exc}); "
            "check the name and that its folder is on PYTHONPATH"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(
            f"module '{module_name}' has no '{attr}' (from _target_ '{target}')"
        ) from exc


def instantiate(spec: Mapping[str, Any] | Any, **kwargs: Any) -> Any:
    """Build ``spec['_target_'](**spec_without_private_keys, **kwargs)``.

    Keys starting with ``_`` are not passed on. A wrong keyword becomes a one-line ConfigError.
    """
    spec = to_plain(spec)
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(f"expected a mapping with a _target_ key, got {spec!r}")
    cls = locate(str(spec["_target_"]))
    params = {k: v for k, v in spec.items() if not str(k).startswith("_")}
    params.update(kwargs)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"cannot build {spec['_target_']}: {exc}") from exc
