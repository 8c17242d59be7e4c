"""Plugin registration through RecBole's own lookups, property layering, checkpoint reload."""
import multiprocessing
import sys

import pytest

import recbole_vlm2rec  # noqa: F401
from helpers import FIXTURES, TESTS_DIR

sys.path.insert(0, str(TESTS_DIR))
from plugin_toy.toy_plugin_rec import ToyPluginRec, ToyPluginRecDataset, ToyPluginRecTrainer  # noqa: E402

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402

BASE = {"data_path": str(FIXTURES), "checkpoint_dir": None}


def _config(tmp_path, **overrides):
    config_dict = dict(BASE, checkpoint_dir=str(tmp_path / "saved"), **overrides)
    return Config(
        model="ToyPluginRec",
        dataset="tiny-seq",
        config_file_list=[str(FIXTURES / "tiny-seq.yaml")],
        config_dict=config_dict,
    )


def test_plugin_model_resolves_through_recbole_lookups(tmp_path):
    config = _config(tmp_path)
    assert get_model("ToyPluginRec") is ToyPluginRec
    assert get_trainer(config["MODEL_TYPE"], "ToyPluginRec") is ToyPluginRecTrainer
    dataset = create_dataset(config)
    assert type(dataset) is ToyPluginRecDataset


def test_property_layers(tmp_path, monkeypatch):
    # plugin YAML (internal priority) < config file < config dict < command line
    assert _config(tmp_path)["toy_dim"] == 8 and _config(tmp_path)["toy_marker"] == "from-yaml"
    override = tmp_path / "override.yaml"
    override.write_text("toy_dim: 12\ntoy_marker: from-file\n")
    config = Config(
        model="ToyPluginRec",
        dataset="tiny-seq",
        config_file_list=[str(FIXTURES / "tiny-seq.yaml"), str(override)],
        config_dict=dict(BASE, checkpoint_dir=str(tmp_path), toy_marker="from-dict"),
    )
    assert config["toy_dim"] == 12 and config["toy_marker"] == "from-dict"
    monkeypatch.setattr(sys, "argv", ["run_recbole", "--toy_dim=16"])
    assert _config(tmp_path)["toy_dim"] == 16


def test_builtin_model_defaults_untouched(tmp_path):
    config = Config(model="SASRec", dataset="tiny-seq", config_dict=dict(BASE, checkpoint_dir=str(tmp_path)))
    assert config["hidden_size"] == 64 and config["loss_type"] == "CE"  # RecBole's SASRec.yaml
    assert config["train_neg_sample_args"] is None or config["train_neg_sample_args"]["distribution"] == "none"


def test_unknown_model_error_lists_models():
    with pytest.raises(ValueError, match=r"unknown model 'NoSuchModel'.*SASRec"):
        get_model("NoSuchModel")


def _train_and_save(tmp_path):
    config = _config(tmp_path, epochs=1)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    model = ToyPluginRec(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.fit(train_data, valid_data, verbose=False, saved=True)
    return trainer.saved_model_file, model


def test_checkpoint_reloads_with_load_data_and_model(tmp_path):
    from recbole.quick_start import load_data_and_model  # RecBole's name, patched by the compat layer

    checkpoint, trained = _train_and_save(tmp_path)
    config, model, dataset, train_data, _, _ = load_data_and_model(checkpoint)
    assert type(model) is ToyPluginRec and type(dataset) is ToyPluginRecDataset
    for key, value in trained.state_dict().items():
        assert (model.state_dict()[key] == value).all()


def _resolve_in_child(queue):
    # a fresh spawned interpreter: the pickled target's module import re-registers the plugin
    from recbole.utils import get_model

    queue.put(get_model("ToyPluginRec").__name__)


def test_registration_in_spawned_worker():
    context = multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    process = context.Process(target=_resolve_in_child, args=(queue,))
    process.start()
    process.join(120)
    assert process.exitcode == 0 and queue.get() == "ToyPluginRec"


def test_torch_num_threads_key_sets_cpu_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        Config(model="SASRec", dataset="tiny-seq", config_dict=dict(BASE, checkpoint_dir=str(tmp_path), torch_num_threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ models that need an optional package
def _pretend_missing(monkeypatch, *packages, installed=()):
    """Make the registry see ``packages`` as not installed and ``installed`` as installed, whatever this
    machine has."""
    from recbole_vlm2rec import registry

    real = getattr(registry.is_installed, "real", registry.is_installed)

    def is_installed(name):
        return name in installed or (name not in packages and real(name))

    is_installed.real = real
    monkeypatch.setattr(registry, "is_installed", is_installed)


@pytest.mark.parametrize("model, package, pip", [("NCL", "faiss", "faiss-cpu"), ("KGAT", "dgl", "dgl"),
                                                 ("KGIN", "torch_scatter", "torch-scatter"),
                                                 ("MCCLK", "torch_scatter", "torch-scatter")])
def test_model_that_needs_a_missing_package_names_it_and_its_pip_command(monkeypatch, model, package, pip):
    from recbole_vlm2rec.registry import MissingPackageError, UnknownModelError, check_model_name

    _pretend_missing(monkeypatch, package)
    for lookup in (check_model_name, get_model):  # the command's check, RecBole's (wrapped) get_model
        with pytest.raises(MissingPackageError) as error:
            lookup(model)
        message = str(error.value)
        assert isinstance(error.value, UnknownModelError)  # reported like a bad model name: exit 2
        assert message == (f"model '{model}' needs the optional package {package}, not installed here: "
                           f"pip install {pip}")
        assert "unknown" not in message and "\n" not in message


def test_exlib_models_name_both_packages_recbole_imports_for_them(monkeypatch):
    """RecBole's exlib_recommender/__init__.py imports lightgbm and xgboost for both its models: RecBole then
    says "No module named 'lightgbm'" even for XGBoost, and for every name it does not know."""
    from recbole_vlm2rec.registry import MissingPackageError, check_model_name

    _pretend_missing(monkeypatch, "lightgbm", "xgboost")
    with pytest.raises(MissingPackageError, match=r"^model 'XGBoost' needs the optional packages xgboost and "
                       r"lightgbm, not installed here \(lightgbm: RecBole's exlib_recommender package imports "
                       r"it\): pip install xgboost lightgbm$"):
        check_model_name("XGBoost")
    _pretend_missing(monkeypatch, "lightgbm", installed=("xgboost",))  # XGBoost still needs lightgbm
    with pytest.raises(MissingPackageError, match=r"needs the optional package lightgbm,.*pip install lightgbm$"):
        check_model_name("XGBoost")
    with pytest.raises(ValueError, match=r"^unknown model 'lightgbm'"):  # names are case-sensitive
        check_model_name("lightgbm")


def test_installed_packages_are_not_reported(monkeypatch):
    from recbole_vlm2rec import registry

    monkeypatch.setattr(registry, "is_installed", lambda name: True)
    for model in ("NCL", "KGAT", "KGIN", "MCCLK", "LightGBM", "XGBoost", "BPR", "SASRec"):
        assert registry.missing_packages(model) == ()
    assert registry.missing_packages("VLM2Rec") == () and registry.missing_packages("NoSuchModel") == ()


def test_command_exits_2_with_one_line_for_a_model_that_needs_a_missing_package(monkeypatch, capsys):
    from recbole_vlm2rec.cli import main

    _pretend_missing(monkeypatch, "faiss")
    assert main(["--model=NCL", "--dataset=tiny-all", f"--data_path={FIXTURES}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("run_recbole: error: model 'NCL' needs the optional package faiss, not installed here: "
                     "pip install faiss-cpu")


def test_setting_that_needs_a_missing_package_is_a_bad_setting(monkeypatch, capsys, tmp_path):
    """NNCF needs python-louvain only with neigh_info_method: louvain; by default it runs without it."""
    from recbole_vlm2rec.cli import main
    from recbole_vlm2rec.registry import MissingPackageError, check_model_name

    _pretend_missing(monkeypatch, "community")
    check_model_name("NNCF")  # the default (knn) needs nothing
    Config(model="NNCF", dataset="tiny-all", config_dict=dict(BASE, checkpoint_dir=str(tmp_path)))
    with pytest.raises(MissingPackageError, match="with neigh_info_method: louvain needs the optional package"):
        Config(model="NNCF", dataset="tiny-all",
               config_dict=dict(BASE, checkpoint_dir=str(tmp_path), neigh_info_method="louvain"))
    assert main(["--model=NNCF", "--dataset=tiny-all", f"--data_path={FIXTURES}",
                 "--neigh_info_method=louvain"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "run_recbole: error: model 'NNCF' with neigh_info_method: louvain needs the optional package community, "
        "not installed here: pip install python-louvain")
