"""The Python API, in the scverse style::

    import dpvae
    model = dpvae.fit(adata, "trainer.max_epochs=30", "model.likelihood=nb")
    latent = model.embed(query)              # (cells, latent_dim), genes matched by name
    xy = model.predict(query)                # (cells, 2 or 3) in the reference's frame
    model.annotate(query)                    # obsm['spatial_dpvae'], obsm['X_dpvae'], uns['dpvae']
    model.save("runs/mine")                  # a run folder, as train.py writes
    model = dpvae.load("runs/mine")          # a run folder of either, or its model.ckpt

:func:`fit` takes the command line's own ``key=value`` strings and trains through the same
composition root (:func:`dpvae.pipeline.train`) in memory: nothing is written until
:meth:`Model.save`. Post-inference methods return arrays and leave the AnnData alone, except
:meth:`Model.annotate`, which exists to write into it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpvae.errors import DataError
from dpvae.run_folder import CHECKPOINT_FILE, CONFIG_FILE, THROUGH_FILE

if TYPE_CHECKING:
    import anndata as ad

    from dpvae.network import Parts
    from dpvae.placement import Prediction, ReferenceEmbedding


class Model:
    """A trained dp-VAE with the reference cells it places query cells against.

    Attributes:
        module: the trained network: the :class:`dpvae.module.DPVAE` LightningModule after
            :func:`fit`, a :class:`dpvae.network.Network` (the same parts, state and inference
            methods, built without importing Lightning) after :func:`load`.
        reference: the run's reference cells (:class:`dpvae.placement.ReferenceEmbedding`), or
            ``None`` (then :meth:`predict` needs ``reference=``).
        config: the configuration it was trained with, when known.
        through: a fine-tuned model's starting model's reference cells, when its
            cross-validation chose to place a query through them (:mod:`dpvae.anchors`): then
            :meth:`predict` does so by default, carried into the frame of ``anchors``.
        anchors: the cells the model was fine-tuned on (expression and coordinates; an AnnData
            or its file), when known.
    """

    def __init__(
        self,
        module: Parts,
        reference: ReferenceEmbedding | None = None,
        config: dict[str, Any] | None = None,
        through: ReferenceEmbedding | None = None,
        anchors: ad.AnnData | Path | None = None,
    ) -> None:
        self.module = module.cpu().eval()
        self.reference = reference
        self.config = config
        self.through = through
        self.anchors = anchors
        #: a fine-tuned model's cross-validation (:class:`dpvae.finetune.CrossValidation`), when
        #: it ran in this process
        self.cross_validation: Any = None

    def __repr__(self) -> str:
        ref = (
            f"{len(self.reference)} reference cells"
            if self.reference is not None
            else "no reference"
        )
        return (
            f"dpvae.Model({len(self.genes)} genes, latent_dim={self.latent_dim}, "
            f"lambda={self.module.scale_value():.3g}, {ref})"
        )

    @property
    def genes(self) -> list[str]:
        """The genes the model reads, in order (a query's are matched to them by name)."""
        return self.module.genes

    @property
    def latent_dim(self) -> int:
        """Width of the latent code."""
        return int(self.module.hparams["latent_dim"])

    def embed(self, adata: ad.AnnData | str | Path, layer: str | None = None) -> np.ndarray:
        """Latent codes (posterior means) of ``adata``'s cells (an AnnData or an ``.h5ad``
        path), genes matched by name."""
        from dpvae.placement import encode

        return encode(self.module, _cells(adata), layer)[0]

    def _predict(
        self, adata: ad.AnnData | str | Path, reference: Any = None, **kwargs: Any
    ) -> Prediction:
        from dpvae.placement import ReferenceEmbedding, predict

        adata = _cells(adata)

        if self.through is not None and kwargs.get("mode", "impute") == "impute":
            if kwargs.get("anchors") is None:
                # a fine-tuned model that places through its starting model's cells: the
                # reference given is the anchors (their expression and coordinates)
                anchors = self.anchors if reference is None else reference
                if anchors is None or isinstance(anchors, ReferenceEmbedding):
                    raise DataError(
                        "this fine-tuned model places cells through its starting model's "
                        "reference cells and needs the cells it was fine-tuned on: pass "
                        "reference=ANCHORS.h5ad (their expression and coordinates)"
                    )
                kwargs["anchors"] = anchors
                reference = self.through
            elif reference is None:
                reference = self.through
        ref = self.reference if reference is None else reference
        return predict(self.module, adata, reference=ref, run_reference=self.reference, **kwargs)

    def predict(
        self,
        adata: ad.AnnData | str | Path,
        mode: str = "impute",
        reference: str | Path | ad.AnnData | ReferenceEmbedding | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Coordinates of ``adata``'s cells (an AnnData, an ``.h5ad`` path or an embedded
        dataset's name, read as :func:`dpvae.io.read_h5ad` reads it).

        ``mode="impute"`` places them in the reference's frame (the model's own reference cells,
        or ``reference=`` an ``.h5ad``/AnnData with coordinates); ``mode="reconstruct"`` gives
        their own layout up to rigid motion. ``reference_section``: for a reference of several
        sections, the one whose frame the cells are placed in (``None``: the first; an unknown
        name is a :class:`~dpvae.errors.ConfigError` listing them). Other keywords are those of
        :func:`dpvae.placement.predict` (``k``, ``layer``, ``align_query``, ``n_iter``,
        ``expression_weight``, ``spatial_key``).
        """
        return self._predict(adata, reference, mode=mode, **kwargs).coords

    def predict_with_radius(
        self,
        adata: ad.AnnData | str | Path,
        reference: str | Path | ad.AnnData | ReferenceEmbedding | None = None,
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(coordinates, radius)`` of ``adata``'s cells placed by impute: each cell's true
        position lies within ``radius`` (in the output frame's units) of its placement with 90%
        probability, calibrated on reference cells (:func:`dpvae.placement.conformal_radius`;
        NaN for a reference of fewer than 4 cells). Keywords as :meth:`predict`."""
        pred = self._predict(adata, reference, mode="impute", **kwargs)
        radius = pred.radius if pred.radius is not None else np.full(len(pred.coords), np.nan)
        return pred.coords, radius

    def annotate(
        self,
        adata: ad.AnnData | str | Path,
        mode: str = "impute",
        reference: str | Path | ad.AnnData | ReferenceEmbedding | None = None,
        **kwargs: Any,
    ) -> ad.AnnData:
        """:meth:`predict` and write the result into ``adata`` (returned): ``obsm['spatial_dpvae']``,
        ``obsm['X_dpvae']``, ``obs['dpvae_radius90']`` (impute: each cell's 90% radius) and
        ``uns['dpvae']`` (mode, genes, lambda, how the radius was calibrated, scores when ``adata``
        has true coordinates). Given a path, the file is read and left as it is: the AnnData
        returned holds the result."""
        adata = _cells(adata)
        if adata.isbacked:
            adata = adata.to_memory()
        self._predict(adata, reference, mode=mode, **kwargs).write_to(adata)
        return adata

    def fine_tune(self, anchors: ad.AnnData | str | Path, *overrides: str) -> Model:
        """A copy of this model fine-tuned on ``anchors``: cells of a new section with known
        positions (``obsm['spatial']``), on this model's genes (matched by name).

        The short schedule of ``train.py init_from=...`` (``overrides`` as in :func:`fit`); the
        returned model's reference cells are the anchors, so :meth:`predict` places the rest of
        that section in the anchors' frame.
        """
        head = ["init_from=<model in memory>"]
        init = copy.deepcopy(self.module)
        return _train(anchors, head, overrides, init=init, source=self.reference)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a run folder: ``model.ckpt``, ``embedding.h5ad`` and ``config.yaml`` (if known).

        :func:`load` and ``dpvae-predict checkpoint=PATH/model.ckpt`` read it back (with
        :attr:`through`, its cells go to ``through.h5ad``; the anchors are not written: pass
        them as ``reference=`` when predicting from the folder).
        """
        from importlib.metadata import PackageNotFoundError, version

        import torch

        from dpvae.placement import EMBEDDING_FILE

        folder = Path(path).expanduser()
        if (folder / CHECKPOINT_FILE).exists() and not overwrite:
            raise DataError(f"{folder} already holds {CHECKPOINT_FILE}; pass overwrite=True")
        folder.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "state_dict": self.module.state_dict(),
            "hyper_parameters": dict(self.module.hparams),
        }
        try:  # what Lightning's loader reads; the version without importing it
            state["pytorch-lightning_version"] = version("lightning")
        except PackageNotFoundError:
            pass
        tmp = folder / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
        try:
            torch.save(state, tmp)
            os.replace(tmp, folder / CHECKPOINT_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        if self.reference is not None:
            self.reference.write(folder / EMBEDDING_FILE)
        if self.through is not None:
            self.through.write(folder / THROUGH_FILE)
        else:  # a folder written over: no stale route through another run's cells
            (folder / THROUGH_FILE).unlink(missing_ok=True)
        if self.config is not None:
            from omegaconf import OmegaConf

            OmegaConf.save(OmegaConf.create(self.config), folder / CONFIG_FILE)
        self.module.checkpoint_path = str((folder / CHECKPOINT_FILE).resolve())
        return folder


class _quiet_lightning:
    """Within ``with``: Lightning's info lines (devices, tips, "fit stopped") and its internal
    warnings hidden, unless ``verbose``; dpvae's own warnings still show."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.levels: dict[str, int] = {}

    def __enter__(self) -> None:
        import logging
        import warnings

        if self.verbose:
            return
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        names = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero")
        for name in names:
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: Any) -> None:
        import logging

        if self.verbose:
            return
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)


def _cells(adata: ad.AnnData | str | Path) -> ad.AnnData:
    """A query: an AnnData as it is, a path (or an embedded dataset's name) read by
    :func:`dpvae.io.read_h5ad` (on disk when large; a missing or unreadable file is a
    :class:`~dpvae.errors.DataError`)."""
    if isinstance(adata, str | Path):
        from dpvae.io import read_h5ad

        return read_h5ad(adata)
    return adata


def _as_reference(reference: Any) -> Any:
    """AnnData objects stay in memory; paths are read by the datamodule (streamed when large)."""
    if isinstance(reference, list | tuple):
        return None if all(isinstance(r, str | Path) for r in reference) else list(reference)
    return reference if not isinstance(reference, str | Path) else None


def fit(
    reference: ad.AnnData | str | Path | Sequence[ad.AnnData | str | Path],
    *overrides: str,
    spatial_key: str = "spatial",
    layer: str | None = None,
) -> Model:
    """Train on ``reference`` and return the :class:`Model`.

    ``reference``: an AnnData, an ``.h5ad`` path, a folder of them, or a list of these (one
    section each, see the README's "Atlases").

    ``overrides`` are the command line's ``key=value`` strings (``"trainer.max_epochs=30"``,
    ``"model.likelihood=nb"``); ``spatial_key`` and ``layer`` say where the coordinates and the
    expression are. Nothing is written: no logger, no checkpoint (save with :meth:`Model.save`).
    """
    head = [f"data.spatial_key={spatial_key}"]
    if layer is not None:
        head.append(f"data.layer={layer}")
    return _train(reference, head, overrides)


def _train(
    reference: Any,
    head: list[str],
    overrides: Sequence[str],
    init: Any = None,
    source: ReferenceEmbedding | None = None,
) -> Model:
    """Train in memory (no logger, no files) on ``reference`` with ``head`` then ``overrides``
    composed onto the defaults; ``init``: a model to fine-tune, ``source`` its reference cells
    (the route through them is scored). The one path of :func:`fit` and
    :meth:`Model.fine_tune`."""
    from dpvae import pipeline
    from dpvae.config import load_config, to_plain
    from dpvae.placement import embed_reference

    head = ["logger=none", *head]
    if isinstance(reference, str | Path):
        head.append(f"data.reference={reference}")
    elif _as_reference(reference) is None:  # a list of paths
        head.append(f"data.reference=[{','.join(str(r) for r in reference)}]")
    else:
        head.append("data.reference=<AnnData in memory>")
    cfg = load_config([*head, *overrides])
    with _quiet_lightning(bool(cfg.get("verbose", False))):
        done = pipeline.train(cfg, reference=_as_reference(reference), init=init, source=source)
    module = done.model.cpu().eval()
    cv = done.cross_validation
    model = Model(
        module, embed_reference(module, done.data, calibration=done.calibration), to_plain(cfg)
    )
    model.cross_validation = cv
    if cv is not None and cv.route == "through":
        from dpvae.io import read_h5ad

        model.through = source
        model.anchors = read_h5ad(reference) if isinstance(reference, str | Path) else reference
    return model


def load(path: str | Path) -> Model:
    """Load a run folder (``train.py``'s, ``dpvae-train``'s or :meth:`Model.save`'s) or its
    ``model.ckpt``, with the run's reference cells (``embedding.h5ad`` beside it) when present."""
    from dpvae.network import Network
    from dpvae.paths import LOAD_FIX, find_checkpoint
    from dpvae.placement import EMBEDDING_FILE, ReferenceEmbedding

    ckpt = find_checkpoint(path, LOAD_FIX)
    module = Network.from_checkpoint(ckpt)  # prediction without importing Lightning
    embedding = ckpt.parent / EMBEDDING_FILE
    reference = None
    if embedding.exists():
        reference = ReferenceEmbedding.read(embedding, int(module.hparams["latent_dim"]))
    through = None
    if (ckpt.parent / THROUGH_FILE).exists():
        through = ReferenceEmbedding.read(
            ckpt.parent / THROUGH_FILE, int(module.hparams["latent_dim"])
        )
    config = None
    if (ckpt.parent / CONFIG_FILE).exists():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(ckpt.parent / CONFIG_FILE))
    plain = dict(config) if isinstance(config, dict) else None
    anchors = None
    if through is not None and plain is not None:  # the fine-tuning cells' file, when it is one
        named = (plain.get("data") or {}).get("reference")
        if isinstance(named, str) and Path(named).expanduser().is_file():
            anchors = Path(named).expanduser()
    return Model(module, reference, plain, through=through, anchors=anchors)  # type: ignore[arg-type]


def fit_predict(
    reference: ad.AnnData,
    query: ad.AnnData,
    task: str = "impute",
    seed: int = 0,
    overrides: Sequence[str] = (),
    radius: bool = False,
) -> Any:
    """Train on ``reference`` and return the query cells' coordinates in the reference's frame.

    The path behind every number of BENCHMARKS.md. For ``transfer`` (the query is another section)
    the query's codes are first centred on the reference's (``align_query``). With ``radius``,
    returns ``(coordinates, radius)``: each cell's calibrated 90% radius as
    :meth:`Model.predict_with_radius` gives it.
    """
    if task not in ("impute", "transfer"):
        raise ValueError(f"task must be 'impute' or 'transfer', got {task!r}")
    model = fit(reference, f"seed={seed}", *overrides)
    if radius:
        return model.predict_with_radius(query, align_query=task == "transfer")
    return model.predict(query, align_query=task == "transfer")
