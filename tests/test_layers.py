"""The layering rules of the README's Layout section, read from the source (no imports run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: module name -> file, for every module of the installed package (the wings under their names)
FOLDERS = {"dpvae": ROOT / "dpvae", "dpvae.datamodules": ROOT / "datamodules"}
FOLDERS["dpvae.callbacks"] = ROOT / "callbacks"
# the package's __init__ re-exports the API lazily: a front end (importing a submodule imports it
# as the parent, which is not counted)
FRONT = {"dpvae", "dpvae.pipeline", "dpvae.api", "dpvae.cli", "dpvae.predict"}
FRONT |= {"dpvae.run_folder", "dpvae.finetune"}  # finetune: fold fits through the pipeline
WINGS = ("dpvae.datamodules", "dpvae.callbacks")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if prefix == "dpvae" and parts[0] in ("datamodules", "callbacks"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _layer(module: str) -> str:
    if module in FRONT:
        return "front"
    for wing in WINGS:
        if module == wing or module.startswith(wing + "."):
            return wing
    return "maths"


def _violations() -> list[str]:
    bad = []
    modules = _modules()
    for name, path in modules.items():
        layer = _layer(name)
        for target in _imports(name, path):
            if target.split(".")[0] in ("benchmarks", "tests", "train"):
                bad.append(f"{name} imports {target} (outside the installed package)")
            if target not in modules or target == "dpvae":
                continue
            other = _layer(target)
            if layer == "maths" and other != "maths":
                bad.append(f"{name} (maths) imports {target} ({other})")
            if layer in WINGS and other not in ("maths", layer):
                bad.append(f"{name} ({layer}) imports {target} ({other})")
    return bad


def test_imports_flow_one_way() -> None:
    """The maths imports neither wing nor a front end; the wings import the maths only."""
    assert len(_modules()) > 25  # the scan sees the package
    assert _violations() == []


def test_the_rule_catches_a_violation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A maths module that imports the callbacks is reported (the check can fail)."""
    fake = tmp_path / "dpvae"
    fake.mkdir()
    (fake / "solver.py").write_text("from dpvae.callbacks import SpatialValidation\n")
    (fake / "__init__.py").write_text("")
    monkeypatch.setitem(FOLDERS, "dpvae", fake)
    assert any("dpvae.solver (maths) imports dpvae.callbacks" in v for v in _violations())


@pytest.mark.parametrize("command", ["train.py", "-m dpvae.predict"])
def test_help_imports_no_torch(command: str) -> None:
    """--help answers from the YAML before torch, Lightning or anndata are imported."""
    code = (
        "import sys, runpy; sys.argv = ['x', '--help']\n"
        f"target = {command.split()[-1]!r}\n"
        "try:\n"
        "    runpy.run_path(target, run_name='__main__') if target.endswith('.py') else "
        "runpy.run_module(target, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = [m for m in ('torch', 'lightning', 'anndata', 'wandb') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: " in proc.stdout and "[KEY=VALUE ...]" in proc.stdout
    assert ("k=8" if "predict" in command else "trainer.max_epochs=60") in proc.stdout


@pytest.mark.parametrize("command", ["train", "predict"])
def test_the_first_line_comes_before_torch(command: str, tmp_path: Path) -> None:
    """Every command says what it is doing (its first stdout line) before it imports torch,
    Lightning or anndata: a user sees work start within the interpreter's own start-up."""
    (tmp_path / "m.ckpt").write_bytes(b"")  # the command checks that its files exist first
    (tmp_path / "q.h5ad").write_bytes(b"")
    argv = (
        [f"run_dir={tmp_path / 'run'}", "logger=none"]
        if command == "train"
        else [
            f"checkpoint={tmp_path / 'm.ckpt'}",
            f"query={tmp_path / 'q.h5ad'}",
            f"output={tmp_path / 'o.h5ad'}",
        ]
    )
    code = (
        "import sys\n"
        "import dpvae.cli as cli\n"
        "def first(what):\n"
        "    heavy = [m for m in ('torch', 'lightning', 'anndata', 'wandb') if m in sys.modules]\n"
        "    print('FIRST', what, heavy)\n"
        "    raise SystemExit(0)\n"
        "cli.say_started = first\n"
        f"sys.exit(cli.{command}_main({argv!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[0]
    what = "training on osmfish" if command == "train" else "placing"
    assert line.startswith(f"FIRST {what}") and line.endswith("[]"), line


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("train", ["model.lr=-1"], "model.lr must be 0 or more, got -1"),
        ("train", ["model.latent_dim=0"], "model.latent_dim must be at least 1"),
        ("train", ["data.reference=MISSING/x.h5ad"], "x.h5ad: no such file"),
        ("train", ["data.reference=[osmfish,MISSING/x.h5ad]"], "item 2 of data.reference"),
        ("train", ["data.batch_size=1"], "data.batch_size must be at least 2, got 1"),
        ("train", ["data.near_weight=2"], "data.near_weight must be in"),
        ("train", ["trainer.max_epochs=-3"], "trainer.max_epochs must be at least -1, got -3"),
        ("train", ["init_from=MISSING/model.ckpt"], "no such checkpoint; init_from takes"),
        ("train", ["seed=-1"], "seed must be 0 or more"),
        ("train", ["threads=0"], "threads must be 1 or more (or null), got 0"),
        ("train", ["trainer.check_val_every_n_epoch=0"], "check_val_every_n_epoch must be at"),
        ("train", ["model.encoder.dropout=2"], "model.encoder: dropout must be in [0, 1), got 2"),
        ("train", ["model.decoder.activation=foo"], "model.decoder: unknown activation 'foo'"),
        ("train", ["model.regularizer.init_scale=-1"], "model.regularizer: the regularizer's"),
        ("train", ["callbacks.early_stopping.mode=up"], "early_stopping.mode must be min or max"),
        ("train", ["callbacks.checkpoint.every_n_seconds=-1"], "every_n_seconds must be 0 or"),
        ("train", ["callbacks.spatial.k=0"], "callbacks.spatial.k must be at least 1, got 0"),
        ("train", ["callbacks.best.mode=up"], "callbacks.best.mode must be min or max"),
        ("train", ["callbacks.checkpoint.every_n_epochs=-1"], "every_n_epochs must be a whole"),
        ("train", ["run_dir=QUERY/run"], "q.h5ad is a file, not a folder"),
        ("predict", ["checkpoint=CKPT", "query=QUERY", "output=QUERY/o.h5ad"], "is a file, not"),
        ("predict", ["checkpoint=MISSING/run", "query=QUERY"], "no such checkpoint; give a run"),
        ("predict", ["checkpoint=CKPT", "query=MISSING/q.h5ad"], "q.h5ad: no such file"),
    ],
)
def test_argument_errors_come_before_torch(
    command: str, args: list[str], message: str, tmp_path: Path
) -> None:
    """A mistyped value or a missing file is answered (one line, exit 2) before torch,
    Lightning or anndata are imported: in a tenth of a second, not four."""
    (tmp_path / "m.ckpt").write_bytes(b"")
    (tmp_path / "q.h5ad").write_bytes(b"")
    names = {"MISSING": str(tmp_path / "missing"), "QUERY": str(tmp_path / "q.h5ad")}
    names["CKPT"] = str(tmp_path / "m.ckpt")
    for key, value in names.items():
        args = [a.replace(key, value) for a in args]
    extra = (
        [f"run_dir={tmp_path / 'run'}", "logger=none"]
        if command == "train"
        else [f"output={tmp_path / 'o.h5ad'}"]
    )
    code = (
        "import sys\n"
        "import dpvae.cli as cli\n"
        f"status = cli.{command}_main({[*extra, *args]!r})\n"
        "heavy = [m for m in ('torch', 'lightning', 'anndata', 'wandb') if m in sys.modules]\n"
        "print('STATUS', status, heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip().splitlines()[-1] == "STATUS 2 []", (proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpvae: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "o.h5ad").exists()
