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
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpvae.errors import ConfigError

ENV_CONFIG_PATH = "DPVAE_CONFIG_PATH"
ROOT_FILE = "train.yaml"


def default_conf_dir() -> Path:
    """The project's ``conf/`` folder (a checkout's top level, or the copy inside an installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):  # a wheel's dpvae/conf, a checkout's
        if (candidate / ROOT_FILE).exists():
            return candidate
    raise ConfigError(f"cannot find dpvae's conf/ folder next to {here}; reinstall dpvae")


def config_roots(conf_dir: Path | None = None) -> list[Path]:
    """Folders searched for option files: ``$DPVAE_CONFIG_PATH`` entries, then ``conf_dir``."""
    roots = [Path(p).expanduser() for p in os.environ.get(ENV_CONFIG_PATH, "").split(":") if p]
    roots.append(conf_dir or default_conf_dir())
    return roots


#: keys that do not change what a run computes, left out of the default run name
RUN_NAME_IGNORES = (
    "run_dir",
    "resume",
    "threads",
    "verbose",
    "logger",
    "embedding",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "data.backed",
    "data.backed_threshold_mb",
    "data.num_workers",
    "callbacks.report",
    "callbacks.validation",  # which epochs validate: the same model and random numbers
)


#: keys added after a release, left out of the default run name at their default value: an
#: upgrade keeps the folder a rerun of the same command resumes
RUN_NAME_AT_DEFAULT = {"finetune.route": "auto"}


def _run_name(*, _root_: Any) -> str:
    """``REFERENCE-HASH``: the reference's name and a hash of the configuration's values.

    The same command (same reference, same settings) gives the same run folder, so rerunning it
    resumes; DDP's re-executed ranks agree without sharing anything.
    """
    import hashlib
    import json

    tree = OmegaConf.to_container(_root_, resolve=False)
    assert isinstance(tree, dict)
    for dotted in (*RUN_NAME_IGNORES, *RUN_NAME_AT_DEFAULT):
        node: Any = tree
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        default = RUN_NAME_AT_DEFAULT.get(dotted, node)  # node: never equal to a leaf value
        if isinstance(node, dict) and (dotted in RUN_NAME_IGNORES or node.get(last) == default):
            node.pop(last, None)
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()
    data: Any = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    reference = data.get("reference", "run")
    many = isinstance(reference, list) and len(reference) > 1
    if isinstance(reference, list):
        reference = reference[0] if reference else "run"
    stem = Path(str(reference)).name.removesuffix(".h5ad") or "run"
    if many:
        stem += f"+{len(data['reference']) - 1}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)[:40]}-{digest[:10]}"


def _run_id(run_dir: Any) -> str:
    """A stable id for a run folder (its absolute path's hash): a resumed run keeps its W&B run."""
    import hashlib

    path = str(Path(str(run_dir)).expanduser().resolve())
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def _register(name: str, fn: Any) -> None:
    import omegaconf

    major_minor = tuple(int(p) for p in omegaconf.__version__.split(".")[:2])
    # omegaconf 2.4 renamed register_new_resolver to register_resolver (2.3's register_resolver
    # is the legacy string-only API)
    register = (
        OmegaConf.register_resolver if major_minor >= (2, 4) else OmegaConf.register_new_resolver
    )
    if not OmegaConf.has_resolver(name):
        register(name, fn)


_register("run_name", _run_name)
_register("run_id", _run_id)


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


#: keys besides sections and ``trainer.*`` where null means a library's default
NULLABLE = ("threads", "callbacks.early_stopping.monitor")
#: text keys that also take a list of texts (several files)
TEXT_OR_LIST = ("data.reference",)
#: root-file section of profiles: ``{KEY: {dotted key: value}}``, values that replace defaults
#: when KEY is set on the command line (train.yaml's fine-tuning schedule under ``init_from``)
PROFILES_KEY = "_profiles_"
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_name(default: Any) -> str:
    if isinstance(default, list):
        return "a list, e.g. [1,2] or 1,2"
    if isinstance(default, dict):
        return "a section"
    return _TYPE_NAMES.get(type(default), type(default).__name__)


def _coerce(key: str, default: Any, value: Any) -> Any:
    """``value`` checked against the type of the default it replaces (strict, one-line errors).

    An integer default takes integers, a float default numbers, a boolean default ``true`` or
    ``false``; a string default takes any scalar as text (its component checks the choices); a list
    default takes a list or a comma-separated value (``seeds=0,1,2``), element by element; a null
    default takes anything.
    """
    if default is None:
        return value
    if value is None:  # null drops a section (a callback) or means Lightning's / torch's default
        if isinstance(default, dict) or key.startswith("trainer.") or key in NULLABLE:
            return value
        raise ConfigError(f"{key} cannot be null; give {_type_name(default)}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str | int | float | bool):
            return value if isinstance(value, str | bool) else str(value)
        if key in TEXT_OR_LIST and isinstance(value, list) and value:
            return [_coerce(f"{key}[{i}]", default, v) for i, v in enumerate(value)]
    elif isinstance(default, list):
        if isinstance(value, str) and "," in value:
            value = [_parse_scalar(v.strip()) for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):
            value = [value]
        if default:
            return [_coerce(f"{key}[{i}]", default[0], v) for i, v in enumerate(value)]
        return value
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{key} must be {_type_name(default)}, got {value!r}")


def _parse_scalar(text: str) -> Any:
    try:
        return _parse_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _set_value(
    cfg: dict[str, Any], key: str, value: Any, add: bool, defaults: Mapping[str, Any] | None = None
) -> None:
    parts = key.split(".")
    node: Any = cfg
    ref: Any = defaults
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
        ref = ref.get(part) if isinstance(ref, Mapping) else None
        if last:
            node[part] = value if defaults is None else _coerce(key, ref, value)
            return
        node = node[part]


def _resolved(composed: dict[str, Any]) -> Any:
    try:
        cfg = OmegaConf.create(composed)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config value: {exc}".replace("\n", " ")) from exc
    return cfg


def load_config(
    overrides: Sequence[str] = (), conf_dir: Path | None = None, root_file: str = ROOT_FILE
) -> DictConfig:
    """Compose ``root_file`` with option groups and ``key=value`` overrides; resolve it.

    Every override is checked against the type of the (resolved) default it replaces (see
    :func:`_coerce`). Keys whose default is ``???`` must be given.

    Raises:
        ConfigError: a malformed override, an unknown key or option, a value of the wrong type, a
            missing required key or a bad interpolation.
    """
    roots = config_roots(conf_dir)
    base = None
    for root in reversed(roots):  # the project's root file unless a user root has its own
        if (root / root_file).is_file():
            base = _load_yaml(root / root_file)
    if not isinstance(base, dict):
        raise ConfigError(f"no {root_file} found in {', '.join(map(str, roots))}")
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
    profiles = composed.pop(PROFILES_KEY, None) or {}
    defaults: Any = OmegaConf.to_container(_resolved(composed), resolve=False)
    given = {key for key, _, _ in values}
    for trigger, profile in profiles.items():
        # a profile's values replace defaults when its key is set (explicit overrides still win)
        if any(key == trigger and value not in (None, "") for key, value, _ in values):
            for key, value in profile.items():
                if key not in given:
                    _set_value(composed, key, value, False, defaults)
    for key, value, add in values:
        _set_value(composed, key, value, add, defaults)
    cfg = _resolved(composed)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            "missing " + " ".join(f"{k}=..." for k in missing) + "; --help lists every key"
        )
    return cfg


def flat_defaults(
    conf_dir: Path | None = None, root_file: str = ROOT_FILE
) -> list[tuple[str, Any, str]]:
    """(dotted key, default, comment) of every value of the composed default configuration.

    The comment is the YAML comment on that key's line (option files' comments included), so
    ``--help`` shows what the files say without importing anything heavy.
    """
    roots = config_roots(conf_dir)
    root = next((r for r in roots if (r / root_file).is_file()), None)
    if root is None:
        raise ConfigError(f"no {root_file} found in {', '.join(map(str, roots))}")
    comments = _comments(root / root_file, [])
    composed = _compose(_load_yaml(root / root_file), [], roots, {})
    composed.pop(PROFILES_KEY, None)

    def walk(node: Any, path: list[str]) -> list[tuple[str, Any, str]]:
        out: list[tuple[str, Any, str]] = []
        for key, value in node.items():
            sub = [*path, str(key)]
            dotted = ".".join(sub)
            if isinstance(value, dict):
                if _is_group(sub, roots):
                    chosen = _group_choice(root / root_file, sub)
                    for r in roots:
                        f = r.joinpath(*sub, f"{chosen}.yaml")
                        if f.is_file():
                            comments.update(_comments(f, sub))
                            break
                    options = ", ".join(group_options(sub, roots))
                    out.append((dotted, chosen, f"option group: {options}"))
                out.extend(walk(value, sub))
            elif not str(key).startswith("_"):
                out.append((dotted, value, comments.get(dotted, "")))
        return out

    return walk(composed, [])


def _group_choice(root_file: Path, path: list[str]) -> str:
    node: Any = _load_yaml(root_file)
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return str(node)


_LINE = re.compile(r"^(\s*)([A-Za-z_][\w]*):(.*?)(?:\s#\s?(.*))?$")


def _comments(path: Path, prefix: list[str]) -> dict[str, str]:
    """Dotted key -> the comment on its line, for a simple block-style YAML file."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        indent, key, comment = len(m.group(1)), m.group(2), m.group(4)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if comment:
            out[".".join([*prefix, *(k for _, k in stack)])] = comment.strip()
    return out


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

    Keys starting with ``_`` are not passed on. Keywords the target does not take become a
    one-line ConfigError naming the ones it does; an error raised inside the target's own
    constructor is not disguised as a config error.
    """

    spec = to_plain(spec)
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(f"expected a mapping with a _target_ key, got {spec!r}")
    cls = locate(str(spec["_target_"]))
    params = {k: v for k, v in spec.items() if not str(k).startswith("_")}
    params.update(kwargs)
    accepted = _accepted_keywords(cls)
    unknown = sorted(set(params) - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(
            f"cannot build {spec['_target_']}: no argument {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(sorted(accepted or ()))}"
        )
    return cls(**params)


def _accepted_keywords(cls: Any) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up the class's bases
    (``None`` when that cannot be told, e.g. a builtin or a function taking ``**kwargs``)."""
    import inspect

    if isinstance(cls, type):
        chain = [vars(k)["__init__"] for k in cls.__mro__ if "__init__" in vars(k)]
    else:
        chain = [cls]
    names: set[str] = set()
    for func in chain:
        try:
            parameters = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            return None
        names.update(
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names
    return None
