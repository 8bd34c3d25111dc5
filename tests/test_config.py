from pathlib import Path

import pytest

from smalltalk.config import load_config
from smalltalk.errors import SmalltalkError

from .conftest import TINY_CONFIG, cli


def test_yaml_and_dotted_overrides():
    cfg = load_config(TINY_CONFIG, ["train.lr=3e-4", "routing.router.preset=cpu-router-0.1m", "data.max_docs=7"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.routing.router.preset == "cpu-router-0.1m"
    assert cfg.data.max_docs == 7
    assert cfg.model.preset == "test-tiny"  # from the file
    assert cfg.train.beta2 == 0.99  # paper default survives a partial section


def test_unknown_key_is_named(tmp_path: Path):
    with pytest.raises(SmalltalkError, match=r"unknown config key 'train\.lrr'"):
        load_config(TINY_CONFIG, ["train.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  seq_lenn: 5\n")
    with pytest.raises(SmalltalkError, match=r"data\.seq_lenn") as info:
        load_config(bad)
    assert str(bad) in str(info.value)


def test_wrong_type_is_named():
    with pytest.raises(SmalltalkError, match=r"'train\.steps' must be int"):
        load_config(None, ["train.steps=many"])


def test_cli_unknown_key_exits_nonzero(capsys, tmp_path):
    assert cli("train", "lm", "--config", TINY_CONFIG, "--run", tmp_path / "r", "--set", "train.bogus=1") == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.bogus'" in err and "valid keys" in err
    assert not (tmp_path / "r").exists()


def test_values_wrong_whatever_the_data_are_refused_at_load():
    for override, words in (("routing.method=magic", "unknown routing.method"),
                            ("routing.experts=1", "at least 2 experts"),
                            ("routing.prefix=5000", "routing.prefix"),
                            ("eval.prefixes=[1,8]", "eval.prefixes")):
        with pytest.raises(SmalltalkError, match=words):
            load_config(None, [override])
