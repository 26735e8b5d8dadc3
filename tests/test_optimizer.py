"""``model.optimizer``: AdamW's implementation. ``foreach`` trains to exactly the numbers of
torch's per-parameter ``loop`` (dpvae's optimizer before the option); ``fused`` (the default)
agrees with them to rounding."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pytest
import torch

import dpvae
from dpvae.module import DPVAE

SHORT = ("trainer.max_epochs=4", "model.warmup_epochs=1", "logger=none", "seed=3")


@pytest.fixture(scope="module")
def reference(osmfish_small: Path) -> ad.AnnData:
    return ad.read_h5ad(osmfish_small)


@pytest.fixture(scope="module")
def model(reference: ad.AnnData) -> DPVAE:
    """A model of one epoch: its hyperparameters and weights build the optimizers below."""
    return dpvae.fit(reference, "trainer.max_epochs=1", "logger=none").module


def _weights(reference: ad.AnnData, impl: str) -> dict[str, torch.Tensor]:
    model = dpvae.fit(reference, *SHORT, f"model.optimizer={impl}")
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_foreach_trains_to_the_loop_s_numbers(reference: ad.AnnData) -> None:
    loop = _weights(reference, "loop")
    foreach = _weights(reference, "foreach")
    assert loop.keys() == foreach.keys()
    for key, value in loop.items():
        assert torch.equal(value, foreach[key]), key


def test_a_fused_step_is_the_loop_s_step_to_rounding(model: DPVAE) -> None:
    start = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {
        n: torch.randn_like(p, generator=torch.Generator().manual_seed(i))
        for i, (n, p) in enumerate(model.named_parameters())
    }
    after = {}
    for impl in ("loop", "fused"):
        net = DPVAE(**{**dict(model.hparams), "optimizer": impl})
        net.load_state_dict(start)
        opt = net.configure_optimizers()
        for _ in range(3):
            for n, p in net.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
        after[impl] = {n: p.detach().clone() for n, p in net.named_parameters()}
    for n, p in after["loop"].items():
        assert not torch.equal(p, start[n])  # the steps moved every parameter
        torch.testing.assert_close(after["fused"][n], p, rtol=1e-5, atol=1e-6)


def _optimizer_of(model: DPVAE, **hparams: object) -> torch.optim.Optimizer:
    return DPVAE(**{**dict(model.hparams), **hparams}).configure_optimizers()


def test_the_implementation_asked_for_is_the_one_built(model: DPVAE) -> None:
    assert model.hparams["optimizer"] == "fused"  # the default
    fused = _optimizer_of(model).defaults
    assert fused["fused"] is True and not fused["foreach"]
    foreach = _optimizer_of(model, optimizer="foreach").defaults
    assert foreach["foreach"] is True and not foreach["fused"]
    loop = _optimizer_of(model, optimizer="loop").defaults
    assert loop["foreach"] is False and not loop["fused"]
    assert len(_optimizer_of(model).param_groups[0]["params"]) == len(list(model.parameters()))


def test_fused_falls_back_where_torch_has_no_fused_kernel(model: DPVAE) -> None:
    elsewhere = DPVAE(**dict(model.hparams)).to("meta")  # a device outside FUSED_DEVICES
    defaults = elsewhere.configure_optimizers().defaults
    assert defaults["foreach"] is True and not defaults["fused"]


def test_lambda_s_optimizer_state_starts_when_the_regularizer_switches_on(
    reference: ad.AnnData,
) -> None:
    """In the warm-up lambda's gradient is 0 (its term weighs 0), yet AdamW counts those steps:
    its bias correction then sized lambda's first steps after the switch by the warm-up's length.
    Its state is dropped with its re-initialisation: after training, lambda's AdamW step count
    is the steps since the switch, the other parameters' every step."""
    import lightning.pytorch as L

    seen: dict[str, float] = {}

    class Steps(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: DPVAE) -> None:
            state = trainer.optimizers[0].state
            lam = pl_module.regularizer.log_scale
            seen["lambda"] = float(state[lam]["step"])
            seen["other"] = float(state[next(pl_module.encoder.parameters())]["step"])
            seen["per_epoch"] = float(trainer.num_training_batches)

    from dpvae import pipeline
    from dpvae.config import load_config

    cfg = load_config(["data.reference=<AnnData in memory>", *SHORT])
    pipeline.train(cfg, reference=reference, extra_callbacks=[Steps()])
    assert seen["other"] == 4 * seen["per_epoch"]
    assert seen["lambda"] == 3 * seen["per_epoch"]  # epochs 2-4, after a warm-up of 1
