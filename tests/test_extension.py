"""The README's "Write your own regularizer" recipe, done exactly as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

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
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "model.regularizer=mine",
            "model.warmup_epochs=0",
            f"data.reference={osmfish_small}",
            f"run_dir={run_dir}",
            "logger=csv",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(run_dir / "model.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["regularizer"]["_target_"] == "my_regularizers.LogRatio"
    assert ckpt["hyper_parameters"]["regularizer"]["eps"] == 0.01
    assert "regularizer.log_scale" in ckpt["state_dict"]
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/reg" in metrics
