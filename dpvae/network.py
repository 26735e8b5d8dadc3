"""The dp-VAE's parts and what inference asks of them, without Lightning.

:class:`dpvae.module.DPVAE` (the LightningModule that trains) and :class:`Network` (what
:func:`dpvae.load` and ``dpvae-predict`` build from a checkpoint) share one reading of the
hyperparameters (:func:`model_hparams`) and one set of parts and inference methods
(:class:`Parts`), so a checkpoint's state dict fits both, key for key. Prediction never imports
Lightning: it was 2.7 s of the prediction command's 5.4 s on a 250-cell query.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dpvae.config import instantiate, to_plain
from dpvae.errors import OPTIMIZERS as OPTIMIZERS  # re-exported
from dpvae.errors import DataError, check_model_options
from dpvae.likelihoods import Likelihood
from dpvae.nn import Decoder, Encoder
from dpvae.preprocess import ExpressionTransform, Preprocessor, to_dense
from dpvae.regularizers import DistanceRegularizer

DEFAULT_ENCODER = {"_target_": "dpvae.nn.MLPEncoder"}
DEFAULT_DECODER = {"_target_": "dpvae.nn.MLPDecoder"}
DEFAULT_LIKELIHOOD = {"_target_": "dpvae.likelihoods.GaussianLikelihood"}
DEFAULT_REGULARIZER = {"_target_": "dpvae.regularizers.DPRegularizer"}


def model_hparams(
    n_genes: int,
    preprocess: Preprocessor | Mapping[str, Any],
    encoder: Mapping[str, Any] | None = None,
    decoder: Mapping[str, Any] | None = None,
    likelihood: Mapping[str, Any] | None = None,
    regularizer: Mapping[str, Any] | None = None,
    latent_dim: int = 16,
    beta: float = 0.5,
    alpha: float = 3.0,
    warmup_epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    distance_on: str = "mean",
    optimizer: str = "fused",
) -> tuple[dict[str, Any], Preprocessor]:
    """The model's hyperparameters as plain data (what a checkpoint stores), checked, and the
    :class:`~dpvae.preprocess.Preprocessor` they describe. The arguments are
    :class:`dpvae.module.DPVAE`'s; a checkpoint's ``hyper_parameters`` are them by name."""
    pre = (
        preprocess
        if isinstance(preprocess, Preprocessor)
        else Preprocessor.from_dict(dict(to_plain(preprocess)))
    )
    check_model_options(
        latent_dim=latent_dim,
        beta=beta,
        alpha=alpha,
        warmup_epochs=warmup_epochs,
        lr=lr,
        weight_decay=weight_decay,
        distance_on=distance_on,
        optimizer=optimizer,
    )
    hparams = {
        "n_genes": int(n_genes),
        "preprocess": pre.to_dict(),
        "encoder": to_plain(encoder) or DEFAULT_ENCODER,
        "decoder": to_plain(decoder) or DEFAULT_DECODER,
        "likelihood": to_plain(likelihood) or DEFAULT_LIKELIHOOD,
        "regularizer": to_plain(regularizer) or DEFAULT_REGULARIZER,
        "latent_dim": int(latent_dim),
        "beta": float(beta),
        "alpha": float(alpha),
        "warmup_epochs": int(warmup_epochs),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "distance_on": str(distance_on),
        "optimizer": str(optimizer),
    }
    return hparams, pre


class Parts(nn.Module):
    """The preprocessing transform, likelihood, encoder, decoder and regularizer of a dp-VAE,
    and the inference methods (encode, embed, genes, lambda). A base of both the LightningModule
    and :class:`Network`; ``hparams`` is the subclass's (:func:`model_hparams`'s keys)."""

    preprocessor: Preprocessor
    transform: ExpressionTransform
    likelihood: Likelihood
    encoder: Encoder
    decoder: Decoder
    regularizer: DistanceRegularizer
    scale_initialised: Tensor
    hparams: Any  # the subclass's: model_hparams's keys
    #: the file this model was loaded from or saved to (its run's reference sits beside it)
    checkpoint_path: str | None

    def _build_parts(self, hparams: Mapping[str, Any], pre: Preprocessor) -> None:
        n_genes = int(hparams["n_genes"])
        self.preprocessor = Preprocessor.from_dict(pre.to_dict())
        self.transform = ExpressionTransform.from_preprocessor(pre)
        self.likelihood = instantiate(hparams["likelihood"], n_genes=n_genes)
        n_input = self.transform.n_pcs or n_genes
        latent_dim = int(hparams["latent_dim"])
        self.encoder = instantiate(hparams["encoder"], n_input=n_input, n_latent=latent_dim)
        self.decoder = instantiate(
            hparams["decoder"], n_latent=latent_dim, n_output=n_genes * self.likelihood.n_params
        )
        self.regularizer = instantiate(hparams["regularizer"])
        # whether lambda was re-initialised at switch-on; saved so a resumed run does not redo it
        self.register_buffer("scale_initialised", torch.tensor(False))
        self.checkpoint_path = None

    def _encode(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw expression (B, G) -> (transformed input, posterior mean, log-variance, library)."""
        x, library = self.transform(raw)
        mu, logvar = self.encoder(self.transform.encoder_input(x))
        return x, mu, logvar, library

    def encode(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw expression (B, G) -> (posterior mean, log-variance, library size)."""
        _, mu, logvar, library = self._encode(raw)
        return mu, logvar, library

    def forward(self, raw: Tensor) -> Tensor:
        """The latent embedding (posterior mean) of raw expression (B, G)."""
        return self.encode(raw)[0]

    @property
    def genes(self) -> list[str]:
        """The model's genes, in input order."""
        return list(self.preprocessor.genes)

    def scale_value(self) -> float:
        """lambda (latent units per standardised spatial unit), 1.0 for scale-free regularizers."""
        lam = self.regularizer.scale()
        return 1.0 if lam is None else float(lam.detach())

    def _param_device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    @torch.no_grad()
    def embed(self, raw: Any, batch_size: int = 4096, with_pcs: bool = False) -> Any:
        """Latent embedding (posterior mean) of raw expression.

        ``raw``: an AnnData (genes matched to :attr:`genes` by name, see
        :func:`dpvae.placement.encode`), or a matrix (sparse or dense) whose columns are already
        :attr:`genes` in order. With ``with_pcs``, returns ``(latent, pcs)`` where ``pcs`` are the
        expression principal components prediction uses beside the latent code (``None`` when the
        model has none).
        """
        if hasattr(raw, "var_names") and hasattr(raw, "obs_names"):
            from dpvae.placement import encode

            latent, pcs, _ = encode(self, raw, batch_size=batch_size)
            return (latent, pcs) if with_pcs else latent
        if raw.ndim != 2 or raw.shape[1] != len(self.genes):
            raise DataError(
                f"expected a cells x {len(self.genes)} matrix in the model's gene order, got shape "
                f"{tuple(raw.shape)}; pass an AnnData to match genes by name"
            )
        if not self.transform.loadings_fitted():
            raise DataError(
                "this model's PCA loadings were never fitted; build it from a fitted "
                "Preprocessor (dpvae.pipeline.build_model) or load it from a checkpoint"
            )
        was_training = self.training
        self.eval()
        n = raw.shape[0]
        width = int(self.hparams["latent_dim"])
        z = np.empty((n, width), dtype=np.float32)
        n_pcs = self.transform.neighbour_pcs if with_pcs else 0
        pcs = np.empty((n, n_pcs), dtype=np.float32) if n_pcs else None
        from dpvae.neighbours import release_memory

        device = self._param_device()
        for number, start in enumerate(range(0, n, batch_size)):
            block = raw[start : start + batch_size]
            tensor = torch.as_tensor(to_dense(block), dtype=torch.float32, device=device)
            del block
            z[start : start + len(tensor)] = self._encode(tensor)[1].cpu().numpy()
            if pcs is not None:
                pcs[start : start + len(tensor)] = (
                    self.transform.expression_pcs(tensor).cpu().numpy()
                )
            del tensor
            if number % 16 == 15:  # glibc keeps the freed dense blocks: hand them back
                release_memory()
        release_memory()
        self.train(was_training)
        return (z, pcs) if with_pcs else z


class Network(Parts):
    """A trained dp-VAE for inference: the LightningModule's parts and inference methods and
    its state dict, built without Lightning (:meth:`from_checkpoint`). Its arguments are
    :class:`dpvae.module.DPVAE`'s."""

    def __init__(self, n_genes: int, preprocess: Preprocessor | Mapping[str, Any], **kwargs: Any):
        super().__init__()
        hparams, pre = model_hparams(n_genes, preprocess, **kwargs)
        self.hparams = hparams
        self._build_parts(hparams, pre)

    @property
    def device(self) -> torch.device:
        """The device of the parameters (as a LightningModule's ``device``)."""
        return self._param_device()

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu", fix: str = "") -> Network:
        """The model of a ``model.ckpt`` (training's, or :meth:`dpvae.Model.save`'s): the one
        reader of a model from a checkpoint (prediction, :func:`dpvae.load` and ``init_from``).

        Raises:
            DataError: the file is not a dpvae model checkpoint (one line naming the file, then
                ``fix``).
        """
        path = Path(path).expanduser()
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated, foreign or unsafe: its type, never torch's advice
            reason = type(exc).__name__
        else:
            try:
                parts = {"hyper_parameters", "state_dict"}
                if not isinstance(ckpt, dict) or not parts <= set(ckpt):
                    raise ValueError("it holds no hyper_parameters and state_dict")
                model = cls(**dict(ckpt["hyper_parameters"]))
                model.load_state_dict(ckpt["state_dict"])
                reason = ""
            except Exception as exc:  # no model state, or another model's
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if reason:
            raise DataError(f"{path}: not a dpvae model checkpoint ({reason}){fix}")
        model.checkpoint_path = str(path.resolve())
        return model.eval()
