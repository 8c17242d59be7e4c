"""The RecBole 1.2.1 compatibility layer: numpy aliases, anomaly mode, safe checkpoint loading."""
import os

import numpy as np
import pytest
import torch

import recbole_vlm2rec  # noqa: F401
from recbole_vlm2rec.compat import UnsafeCheckpointError, load_checkpoint


def test_numpy_aliases():
    assert np.float_ is np.float64 and np.complex_ is np.complex128 and np.unicode_ is np.str_
    assert np.bool8 is np.bool_


def test_sine_anomaly_mode_is_off():
    import recbole.model.sequential_recommender.sine  # noqa: F401  (switches it on at import)

    assert not torch.is_anomaly_enabled()


class _RunsCodeOnLoad:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_checkpoint_with_unexpected_object_is_refused(tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "config": _RunsCodeOnLoad()}, path, pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_checkpoint_with_foreign_class_is_refused(tmp_path):
    import argparse

    path = tmp_path / "namespace.pth"
    torch.save({"config": argparse.Namespace(a=1)}, path, pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        load_checkpoint(path)


def test_weights_only_default_stays_on_for_the_process(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": _RunsCodeOnLoad()}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path)


def test_recbole_style_checkpoint_loads(tmp_path):
    from recbole.config import Config

    from helpers import FIXTURES

    config = Config(model="SASRec", dataset="tiny-seq", config_dict={"data_path": str(FIXTURES)})
    path = tmp_path / "ok.pth"
    state = {"config": config, "state_dict": {"w": torch.ones(2)}, "epoch": 0}
    torch.save(state, path, pickle_protocol=4)  # exactly how RecBole's Trainer saves
    loaded = load_checkpoint(path)
    assert loaded["config"]["model"] == "SASRec" and torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_recbole_function_is_refused_even_from_recbole(tmp_path):
    import recbole.utils

    path = tmp_path / "fn.pth"
    torch.save({"config": recbole.utils.ensure_dir}, path, pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="ensure_dir"):
        load_checkpoint(path)
