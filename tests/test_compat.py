"""The RecBole 1.2.1 compatibility layer: numpy aliases, anomaly mode, safe checkpoint loading, graph
adjacency matrices without dok_matrix._update, checkpoints read by models."""
import contextlib
import os
import warnings

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


# ------------------------------------------------------------------ 8. graph adjacency without dok._update
class _DokUpdateAsBeforeScipy113:
    """RecBole's original methods need ``dok_matrix._update`` (scipy < 1.13: a plain dict update)."""

    def __enter__(self):
        import scipy.sparse as sp

        self.had = hasattr(sp.dok_matrix, "_update")
        if not self.had:
            sp.dok_matrix._update = lambda matrix, data: matrix._dict.update(data)

    def __exit__(self, *exc):
        import scipy.sparse as sp

        if not self.had:
            del sp.dok_matrix._update


def _same_sparse(a, b):
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_sparse(x, y) for x, y in zip(a, b))
    a, b = a.coalesce(), b.coalesce()
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.indices(), b.indices())
            and torch.equal(a.values(), b.values()))


def _stub(matrix, n_users, n_items, n_entities):
    import types

    from recbole.model.general_recommender.spectralcf import SpectralCF

    stub = types.SimpleNamespace(interaction_matrix=matrix, inter_matrix=matrix, n_users=n_users, n_items=n_items,
                                 n_entities=n_entities, device=torch.device("cpu"))
    stub.get_eye_mat = types.MethodType(SpectralCF.get_eye_mat, stub)
    return stub


def test_every_dok_update_user_in_recbole_is_patched():
    """Every RecBole method that fills a dok_matrix with ``_update`` is replaced (grep of RecBole's source)."""
    import ast
    import pathlib

    import recbole

    from recbole_vlm2rec.compat import _ADJACENCY_REPLACEMENTS, ORIGINAL_ADJACENCY_METHODS

    found = set()
    for path in pathlib.Path(recbole.__file__).parent.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        if "_update(" not in source:
            continue
        with warnings_ignored():
            tree = ast.parse(source)
        for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
            for method in (node for node in cls.body if isinstance(node, ast.FunctionDef)):
                for call in ast.walk(method):
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr == "_update"):
                        found.add(f"{cls.name}.{method.name}")
    assert found == set(ORIGINAL_ADJACENCY_METHODS) and len(found) == 7
    for key, original in ORIGINAL_ADJACENCY_METHODS.items():
        class_name, method = key.split(".")
        assert getattr(original.__globals__[class_name], method) is _ADJACENCY_REPLACEMENTS[class_name]


@contextlib.contextmanager
def warnings_ignored():
    """RecBole's original methods warn (torch.sparse.FloatTensor, LongTensor of a list); so do ast and numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_adjacency_is_identical_to_recbole_s(seed):
    """Random interactions with duplicates, users and items without interactions, entities beyond the items:
    every replaced method returns exactly what RecBole's dok_matrix code returns (and NCL's degree vector)."""
    import scipy.sparse as sp

    from recbole_vlm2rec import compat

    rng = np.random.default_rng(seed)
    n_users, n_items, n_entities, n = 37, 29, 45, 400
    matrix = sp.coo_matrix((np.ones(n, np.float32), (rng.integers(1, n_users - 3, n), rng.integers(1, n_items - 2, n))),
                           shape=(n_users, n_items))
    for key, original in compat.ORIGINAL_ADJACENCY_METHODS.items():
        ours = compat._ADJACENCY_REPLACEMENTS[key.split(".")[0]]
        for args in ([("si",), ("bi",)] if key.endswith("get_norm_inter_matrix") else [()]):
            reference, patched = (_stub(matrix, n_users, n_items, n_entities) for _ in range(2))
            with _DokUpdateAsBeforeScipy113(), warnings_ignored():
                expected = original(reference, *args)
            assert _same_sparse(expected, ours(patched, *args)), (key, args)
            if hasattr(reference, "diag"):
                assert torch.equal(reference.diag, patched.diag)


@pytest.mark.parametrize("name", ["LightGCN", "NGCF", "NCL", "GCMC", "SpectralCF", "KGIN", "MCCLK"])
def test_graph_model_builds_on_current_scipy_with_recbole_s_matrix(name, tmp_path):
    """The model's constructor runs on the installed scipy and holds the matrix RecBole's own code builds
    from the same dataset (the class is passed, so models whose optional package is missing build too)."""
    import scipy

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from helpers import FIXTURES
    from recbole_vlm2rec.compat import ORIGINAL_ADJACENCY_METHODS

    key = next(key for key in ORIGINAL_ADJACENCY_METHODS if key.startswith(name + "."))
    model_class = ORIGINAL_ADJACENCY_METHODS[key].__globals__[name]
    config = Config(model=model_class, dataset="tiny-all",
                    config_dict={"data_path": str(FIXTURES), "gpu_id": "", "checkpoint_dir": str(tmp_path),
                                 "state": "WARNING", "load_col": None if name in ("KGIN", "MCCLK") else
                                 {"inter": ["user_id", "item_id"]}, **({"num_clusters": 10} if name == "NCL" else {})})
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = model_class(config, train_data._dataset)
    assert tuple(int(part) for part in scipy.__version__.split(".")[:2]) >= (1, 13)  # no dok_matrix._update here
    # RecBole's own code on the matrix the constructor reads (MCCLK later replaces its inter_matrix attribute)
    matrix = train_data._dataset.inter_matrix(form="coo").astype(np.float32)
    reference = _stub(matrix, model.n_users, model.n_items, getattr(model, "n_entities", None))
    with _DokUpdateAsBeforeScipy113(), warnings_ignored():
        expected = ORIGINAL_ADJACENCY_METHODS[key](reference, *(("si",) if name in ("KGIN", "MCCLK") else ()))
    held = {"LightGCN": "norm_adj_matrix", "NGCF": "norm_adj_matrix", "NCL": "norm_adj_mat", "GCMC": "Graph"}
    if name in held:
        assert _same_sparse(expected, getattr(model, held[name]))
    elif name == "SpectralCF":
        assert _same_sparse(expected, model.get_laplacian_matrix())
    elif name == "KGIN":
        assert _same_sparse(expected[0], model.interact_mat)
    else:
        assert _same_sparse(expected, (model.inter_matrix, model.inter_graph))


# ------------------------------------------------------------------ 9. checkpoints read by models themselves
def test_every_recbole_torch_load_goes_through_the_safe_loader():
    """Every module of RecBole that calls ``torch.load`` sees ``load_checkpoint`` as ``torch.load``."""
    import importlib
    import pathlib

    import recbole

    import recbole_vlm2rec.compat as compat

    root = pathlib.Path(recbole.__file__).parent
    callers = {".".join(("recbole",) + path.relative_to(root).with_suffix("").parts)
               for path in root.rglob("*.py") if "torch.load(" in path.read_text(encoding="utf-8")}
    assert set(compat.MODEL_MODULES_LOADING_CHECKPOINTS) <= callers
    assert callers - set(compat.MODEL_MODULES_LOADING_CHECKPOINTS) == {
        "recbole.trainer.trainer", "recbole.quick_start.quick_start"}  # section 3
    for module_name in callers - {"recbole.quick_start.quick_start"}:  # load_data_and_model is replaced
        assert importlib.import_module(module_name).torch.load is load_checkpoint, module_name
    assert importlib.import_module("recbole.quick_start").load_data_and_model is compat.load_data_and_model
    assert torch.load is not load_checkpoint  # torch itself keeps its weights-only default


@pytest.mark.parametrize("module_name", [
    "recbole.model.sequential_recommender.s3rec", "recbole.model.general_recommender.convncf",
    "recbole.model.general_recommender.nais", "recbole.model.general_recommender.ract",
    "recbole.model.general_recommender.neumf", "recbole.model.context_aware_recommender.kd_dagfm"])
def test_model_checkpoint_paths_refuse_what_recbole_never_writes(module_name, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "config": _RunsCodeOnLoad()}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        importlib.import_module(module_name).torch.load(str(path), map_location="cpu")
    assert not (tmp_path / "pwned.txt").exists()


def test_pretrain_checkpoint_loads(tmp_path):
    """``PretrainTrainer.save_pretrained_model``'s file (S3Rec, RaCT): config, epoch, state_dict, optimizer
    state, other parameters, with torch's default pickle protocol."""
    from recbole.config import Config

    from helpers import FIXTURES

    config = Config(model="S3Rec", dataset="tiny-all", config_dict={"data_path": str(FIXTURES), "gpu_id": ""})
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "S3Rec-tiny-all-1.pth"
    torch.save({"config": config, "epoch": 0, "state_dict": layer.state_dict(), "optimizer": optimizer.state_dict(),
                "other_parameter": None}, path)
    loaded = load_checkpoint(path)
    assert loaded["config"]["model"] == "S3Rec" and loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["state_dict"]["weight"], layer.weight.detach())


# ------------------------------------------------------------------ 11. more checkpoint globals
def test_ease_matrix_and_ripplenet_sets_load(tmp_path):
    import collections

    ripple_set = collections.defaultdict(list)
    ripple_set[3].append(([1, 2], [0, 1], [4, 5]))
    path = tmp_path / "other.pth"
    with warnings_ignored():  # numpy's PendingDeprecationWarning for np.matrix
        similarity = np.matrix([[1.0, 0.5], [0.5, 1.0]])
    torch.save({"other_parameter": {"item_similarity": similarity, "ripple_set": ripple_set}}, path, pickle_protocol=4)
    loaded = load_checkpoint(path)["other_parameter"]
    assert type(loaded["item_similarity"]) is np.matrix and loaded["item_similarity"][0, 1] == 0.5
    assert type(loaded["ripple_set"]) is collections.defaultdict and loaded["ripple_set"][3][0][0] == [1, 2]


def test_defaultdict_with_a_foreign_factory_is_refused(tmp_path):
    import collections

    path = tmp_path / "factory.pth"
    torch.save({"x": collections.defaultdict(os.getcwd)}, path, pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="getcwd"):
        load_checkpoint(path)


class _Forwarding(torch.nn.Module):
    """Forwards unknown attributes to its child, as peft's PeftModel and LoraModel do."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_flops_of_a_model_holding_an_attribute_forwarder_are_skipped_not_fatal(caplog):
    # thop's register_buffer("total_ops") raised KeyError on the forwarder (VLM2Rec with finetune: lora)
    import logging

    import recbole.quick_start.quick_start as quick_start

    caplog.set_level(logging.INFO)
    model = torch.nn.Sequential(_Forwarding())
    flops = quick_start.get_flops(model, None, torch.device("cpu"), logging.getLogger("flops-test"), None)
    assert flops is None
    assert "FLOPs not counted: Sequential holds a _Forwarding" in caplog.text
    assert not any("total_ops" in m._buffers for m in model.modules())
