"""The README's "Write your own regularizer" recipe, done exactly as a user would."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import train_process

USER_MODULE = '''
import torch
from dpvae.regularizers import ScaledDistanceRegularizer, pair_distances


class LogRatio(ScaledDistanceRegularizer):
    """Mean squared log-ratio of latent to scaled spatial distance."""

    def __init__(self, eps: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps

    def forward(self, z, coords, pairs):
        dz, d = pair_distances(z, coords, pairs)
        return (torch.log(dz + self.eps) - torch.log(self.scale() * d + self.eps)).pow(2).mean()
'''

USER_YAML = """_target_: my_regularizers.LogRatio
eps: 0.01
init_scale: 1.0
"""


def test_user_regularizer_from_own_module_and_yaml(tmp_path: Path, osmfish_small: Path) -> None:
    (tmp_path / "my_regularizers.py").write_text(USER_MODULE)
    option_dir = tmp_path / "my_conf" / "model" / "regularizer"
    option_dir.mkdir(parents=True)
    (option_dir / "mine.yaml").write_text(USER_YAML)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["DPVAE_CONFIG_PATH"] = str(tmp_path / "my_conf")
    run_dir = tmp_path / "run"
    train_process(
        [
            "model.regularizer=mine",
            "model.warmup_epochs=1",
            f"data.reference={osmfish_small}",
            f"run_dir={run_dir}",
            "logger=csv",
            "trainer.max_epochs=3",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    ckpt = torch.load(run_dir / "model.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["regularizer"]["_target_"] == "my_regularizers.LogRatio"
    assert ckpt["hyper_parameters"]["regularizer"]["eps"] == 0.01
    assert "regularizer.log_scale" in ckpt["state_dict"]
    hp = ckpt["hyper_parameters"]
    _assert_regularizer_trained(run_dir / "csv" / "version_0" / "metrics.csv", hp)


def _assert_regularizer_trained(metrics_csv: Path, hp: dict) -> None:
    """The user's term was computed every epoch, entered the loss with weight alpha once the
    warm-up was over (and not before), and was optimised: its learned lambda moved and the term
    fell."""
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def values(key: str) -> list[tuple[int, float]]:
        return [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]

    warmup, alpha, beta = hp["warmup_epochs"], hp["alpha"], hp["beta"]
    epochs = {key: dict(values(f"train/{key}_epoch")) for key in ("reg", "recon", "kl", "loss")}
    assert sorted(epochs["reg"]) == [0, 1, 2], epochs["reg"]
    for epoch, reg in epochs["reg"].items():
        assert math.isfinite(reg) and reg > 1e-3, (epoch, reg)  # computed from the first epoch
        elbo = epochs["recon"][epoch] + beta * epochs["kl"][epoch]
        weight = alpha if epoch >= warmup else 0.0
        # the logged loss is exactly the ELBO plus alpha times the user's term (after the warm-up)
        assert epochs["loss"][epoch] == pytest.approx(elbo + weight * reg, rel=1e-4), epoch
        if weight:
            assert weight * reg > 0.1 * epochs["loss"][epoch]  # a real part of the objective
    assert epochs["reg"][2] < epochs["reg"][1]  # optimised once it is on
    # lambda: the YAML's init_scale through the warm-up, learned (so moving) afterwards
    lam = values("train/lambda_step")
    during = [v for e, v in lam if e < warmup]
    after = [v for e, v in lam if e >= warmup]
    assert during and during == pytest.approx([hp["regularizer"]["init_scale"]] * len(during))
    assert len(after) >= 10 and len(set(after)) >= 0.9 * len(after)
