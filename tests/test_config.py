"""Config composition: option groups, overrides, strict keys, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpvae.config import group_options, instantiate, load_config
from dpvae.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_defaults_compose_and_resolve() -> None:
    cfg = load_config([], conf_dir=CONF)
    assert cfg.model.regularizer._target_ == "dpvae.regularizers.DPRegularizer"
    assert cfg.model.likelihood._target_ == "dpvae.likelihoods.GaussianLikelihood"
    assert cfg.data.reference == "osmfish"
    assert cfg.data.seed == cfg.seed  # interpolation resolved
    assert cfg.logger.save_dir == cfg.run_dir
    assert cfg.logger.offline is True


def test_group_selection_and_value_override() -> None:
    cfg = load_config(
        [
            "model.regularizer=stress",
            "model.regularizer.init_scale=2.0",
            "trainer.max_epochs=5",
            "model.encoder.hidden=[64,32]",
            "model.beta=1e-3",
            "data.reference=x.h5ad",
        ],
        conf_dir=CONF,
    )
    assert cfg.model.regularizer._target_ == "dpvae.regularizers.StressRegularizer"
    assert cfg.model.regularizer.init_scale == 2.0
    assert cfg.trainer.max_epochs == 5
    assert list(cfg.model.encoder.hidden) == [64, 32]
    assert cfg.model.beta == pytest.approx(1e-3)
    assert cfg.data.reference == "x.h5ad"


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'model\.latnt_dim'.*latent_dim"):
        load_config(["model.latnt_dim=3"], conf_dir=CONF)


def test_unknown_option_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown option 'strss'.*dp, none, stress"):
        load_config(["model.regularizer=strss"], conf_dir=CONF)


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(["trainer.max_epochs"], conf_dir=CONF)


def test_plus_adds_a_new_key() -> None:
    cfg = load_config(["+trainer.fast_dev_run=true"], conf_dir=CONF)
    assert cfg.trainer.fast_dev_run is True


def test_option_from_yaml_path_and_user_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    option = tmp_path / "alt.yaml"
    option.write_text("_target_: dpvae.regularizers.StressRegularizer\ninit_scale: 3.0\n")
    cfg = load_config([f"model.regularizer={option}"], conf_dir=CONF)
    assert cfg.model.regularizer.init_scale == 3.0

    root = tmp_path / "conf"
    (root / "model" / "regularizer").mkdir(parents=True)
    (root / "model" / "regularizer" / "mine.yaml").write_text("_target_: a.B\n")
    monkeypatch.setenv("DPVAE_CONFIG_PATH", str(root))
    assert "mine" in group_options(["model", "regularizer"], [root, CONF])
    cfg = load_config(["model.regularizer=mine"], conf_dir=CONF)
    assert cfg.model.regularizer._target_ == "a.B"


def test_instantiate_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="cannot import"):
        instantiate({"_target_": "no_such_module.Thing"})
    with pytest.raises(ConfigError, match="cannot build dpvae.regularizers.DPRegularizer"):
        instantiate({"_target_": "dpvae.regularizers.DPRegularizer", "bogus": 1})


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (["model", "encoder"], {"mlp"}),
        (["model", "decoder"], {"mlp"}),
        (["model", "likelihood"], {"gaussian", "nb", "zinb"}),
        (["model", "regularizer"], {"dp", "stress", "none"}),
        (["logger"], {"wandb", "csv", "none"}),
        (["data"], {"reference"}),
    ],
)
def test_groups_offer_expected_options(group: list[str], expected: set[str]) -> None:
    assert expected <= set(group_options(group, [CONF]))


def _constructor_defaults(target: str) -> dict[str, object]:
    import inspect

    from dpvae.config import locate

    params = inspect.signature(locate(target)).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def test_yaml_is_the_one_source_of_defaults() -> None:
    """The datamodule's, the callbacks' and the model's constructor defaults are the YAML's, so a
    part built from Python behaves as the command line's default (interpolations skipped)."""
    cfg = load_config(["run_dir=x"])
    specs = {"data": cfg.data, **{f"callbacks.{k}": v for k, v in cfg.callbacks.items()}}
    raw = load_config_raw()
    checked = 0
    for name, spec in specs.items():
        defaults = _constructor_defaults(spec._target_)
        for key, value in spec.items():
            if key.startswith("_") or key not in defaults or "${" in str(raw[name].get(key, "")):
                continue
            assert defaults[key] == value, (
                f"{name}.{key}: constructor {defaults[key]!r}, YAML {value!r}"
            )
            checked += 1
    module = _constructor_defaults("dpvae.network.model_hparams")  # DPVAE and Network take it
    for key, value in cfg.model.items():
        if not isinstance(value, dict | type(cfg.model)) and key in module:
            assert module[key] == value, f"model.{key}: constructor {module[key]!r}, YAML {value!r}"
            checked += 1
    assert checked > 25


def load_config_raw() -> dict[str, dict[str, object]]:
    """The data and callback sections as written (interpolations unresolved)."""
    import yaml

    root = yaml.safe_load((CONF / "train.yaml").read_text())
    data = yaml.safe_load((CONF / "data" / "reference.yaml").read_text())
    return {"data": data, **{f"callbacks.{k}": v for k, v in root["callbacks"].items()}}


def test_the_default_run_folder_keeps_its_name_across_releases() -> None:
    """`python train.py` resumes its run folder after an upgrade only if the folder's name, a
    hash of the configuration, stays the same: a key added since keeps it at its default value
    (RUN_NAME_AT_DEFAULT) and changes it when set. A deliberate change of a default value renames
    the folder; then update this name and say so in the changelog."""
    from dpvae.config import load_config

    assert str(load_config([]).run_dir) == "runs/osmfish-de4576280c"
    assert str(load_config(["finetune.route=auto"]).run_dir) == "runs/osmfish-de4576280c"
    # validating every epoch trains the same model (ValidationSchedule): the same run
    assert str(load_config(["callbacks.validation=null"]).run_dir) == "runs/osmfish-de4576280c"
    assert str(load_config(["finetune.route=through"]).run_dir) != "runs/osmfish-de4576280c"
