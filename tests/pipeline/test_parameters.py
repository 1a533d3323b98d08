"""Step parameters: types, unknown names, hashing."""

from dataclasses import dataclass
from typing import Literal

import pytest

from pipeline.parameters import ParameterError, StepParams, param
from util.config import Config, ConfigError


@dataclass(frozen=True, kw_only=True)
class DemoParams(StepParams):
    step_name = "demo"
    threshold: float = param(5.0, "Threshold, sigma.")
    radii: tuple[float, ...] = param((1.0, 2.0), "Radii in FWHM.")
    method: Literal["median", "mean"] = param("median", "How to combine.")
    timeout: int = param(60, "Seconds.", affects_result=False)

    def validate(self):
        if self.threshold <= 0:
            raise ParameterError(f"demo threshold must be > 0, got {self.threshold}")


def test_defaults_and_overrides():
    p = DemoParams.from_dict({"threshold": 3}, method="mean")
    assert p.threshold == 3 and p.method == "mean" and p.radii == (1.0, 2.0)
    assert DemoParams.from_dict(None, radii=[1, 3]).radii == (1, 3)


def test_hashed_leaves_out_parameters_that_do_not_change_results():
    p = DemoParams()
    assert set(p.hashed()) == {"threshold", "radii", "method"}
    assert "timeout" in p.to_dict()


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": "high"}, "demo parameter 'threshold' must be float, got 'high'"),
    ({"method": "max"}, "'method' must be one of 'median', 'mean'"),
    ({"radii": [1, "a"]}, "'radii'"),
    ({"timeout": 1.5}, "'timeout' must be int"),
    ({"threshold": -1.0}, "threshold must be > 0, got -1.0"),
])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        DemoParams.from_dict(kwargs)


def test_unknown_names_are_rejected():
    with pytest.raises(ParameterError, match="unknown demo parameter.*thresold"):
        DemoParams.from_dict({"thresold": 3.0})


def test_describe_lists_every_parameter():
    text = DemoParams.describe()
    assert "threshold (float, default 5.0): Threshold, sigma." in text
    assert "[not hashed]" in text


def test_config_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "user.yaml"
    bad.write_text("storage:\n  data_rot: /tmp/x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'storage.data_rot' in .*user.yaml"):
        Config.load(bad)
    bad.write_text("db:\n  echo: 3\n")
    with pytest.raises(ConfigError, match=r"'db.echo' in .*user.yaml must be of type bool, got int 3"):
        Config.load(bad)
    bad.write_text("db: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(bad)


def test_config_precedence(tmp_path, monkeypatch):
    user = tmp_path / "user.yaml"
    user.write_text(f"storage:\n  data_root: {tmp_path / 'a'}\n")
    monkeypatch.setenv("SEECHANGE_CONFIG", str(user))
    config = Config.load()
    assert config.get("storage.data_root") == str(tmp_path / "a")
    assert config.get("db.url") == f"sqlite:///{tmp_path / 'a' / 'seechange.sqlite'}"
    config = Config.load(**{"storage.data_root": str(tmp_path / "b")})
    assert config.get("storage.data_root") == str(tmp_path / "b")
    monkeypatch.delenv("SEECHANGE_CONFIG")
    monkeypatch.setenv("SEECHANGE_DATA", str(tmp_path / "c"))
    assert Config.load().get("storage.data_root") == str(tmp_path / "c")
