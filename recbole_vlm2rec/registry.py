"""Names into RecBole's lookups, and default property files.

RecBole 1.2.1 has no plugin registry; it finds things by name:

* ``recbole.utils.get_model(name)`` probes ``recbole.model.<submodule>.<name.lower()>`` with importlib,
  which also finds modules placed in ``sys.modules`` under such a name: ``register_model`` places the
  module that defines a plugin model there.
* ``create_dataset`` looks for ``<Model>Dataset`` and ``get_trainer`` for ``<Model>Trainer`` as attributes
  of ``recbole.data.dataset`` and ``recbole.trainer``: ``register_model`` sets them.
* default properties come only from ``recbole/properties/model/<Model>.yaml``: ``Config`` is taught to
  also read ``properties/model/<Model>.yaml`` and ``properties/dataset/<dataset>.yaml`` shipped here (or
  registered by another package), with RecBole's internal (lowest) priority, so config files, config dicts
  and the command line override them. They are applied after RecBole's own internal files. Like RecBole's
  ``quick_start_config/*_ml-100k.yaml`` presets, ``properties/quick_start/<Model>_on_<dataset>.yaml`` holds
  settings for one model on one dataset (e.g. the demo settings of VLM2Rec on ``vlm2rec-demo``), applied last.

A ``torch_num_threads`` key (any model) sets torch's CPU threads when the Config is built, next to RecBole's
own device set-up. Every Config's merged values are validated (``settings.validate_config``) before RecBole
sets its defaults: a bad value is a ``ConfigError`` naming the key, the value and what is allowed; so is a
setting that needs a package that is not installed (``check_packages_for_settings``).

An unknown model name makes RecBole fail with "No module named 'lightgbm'" (the probe reaches the optional
``exlib_recommender`` package); ``get_model`` is wrapped to name the model and list the available ones. A
RecBole model that needs an optional package that is not installed (LightGBM, XGBoost, KGAT, KGIN, MCCLK,
NCL here) is reported as such, with the package and its pip command (``MissingPackageError``).
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import pkgutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from recbole_vlm2rec import compat
from recbole_vlm2rec.errors import ConfigError


def _properties_dir() -> Path:
    """The top-level properties/ folder: package data ``recbole_vlm2rec.properties`` once installed, the
    folder beside the package when run from a source checkout that was not installed."""
    try:
        return Path(importlib.import_module("recbole_vlm2rec.properties").__file__).parent
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "properties"


PROPERTIES_DIR = _properties_dir()

_RECBOLE_MODEL_SUBMODULES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


class UnknownModelError(ValueError):
    """A model name that neither RecBole nor a registered plugin provides."""


_plugin_models: Dict[str, type] = {}
_model_property_files: Dict[str, Path] = {}
_dataset_property_dirs: List[Path] = [PROPERTIES_DIR / "dataset"]


def _submodule_for(model_class: type) -> str:
    from recbole.utils import ModelType

    return {
        ModelType.GENERAL: "general_recommender",
        ModelType.SEQUENTIAL: "sequential_recommender",
        ModelType.CONTEXT: "context_aware_recommender",
        ModelType.KNOWLEDGE: "knowledge_aware_recommender",
    }.get(model_class.type, "general_recommender")


def register_model(
    model_class: type,
    dataset_class: Optional[type] = None,
    trainer_class: Optional[type] = None,
    properties_file: Optional[os.PathLike] = None,
) -> None:
    """Make ``model_class`` resolvable by name through RecBole's own lookups.

    Args:
        model_class: a RecBole recommender (``AbstractRecommender`` subclass with a ``type``).
        dataset_class: registered as ``<Model>Dataset`` in ``recbole.data.dataset`` (used by ``create_dataset``).
        trainer_class: registered as ``<Model>Trainer`` in ``recbole.trainer`` (used by ``get_trainer``).
        properties_file: the model's default YAML; defaults to ``properties/model/<Model>.yaml`` if present.
    """
    import recbole.data.dataset
    import recbole.trainer

    name = model_class.__name__
    module_path = f"recbole.model.{_submodule_for(model_class)}.{name.lower()}"
    existing = sys.modules.get(module_path)
    if existing is not None and getattr(existing, name, None) not in (None, model_class):
        raise ValueError(f"cannot register model {name!r}: RecBole already has {module_path}")
    sys.modules[module_path] = sys.modules[model_class.__module__]
    _plugin_models[name] = model_class
    compat.allow_model_class_in_checkpoints(model_class)
    if dataset_class is not None:
        setattr(recbole.data.dataset, f"{name}Dataset", dataset_class)
    if trainer_class is not None:
        setattr(recbole.trainer, f"{name}Trainer", trainer_class)
    default_file = PROPERTIES_DIR / "model" / f"{name}.yaml"
    if properties_file is not None:
        _model_property_files[name] = Path(properties_file)
    elif default_file.is_file():
        _model_property_files[name] = default_file


def model_property_file(name: str) -> Optional[Path]:
    """The default property file registered for plugin model ``name`` (None if it has none)."""
    return _model_property_files.get(name)


def builtin_models() -> List[str]:
    """Names of RecBole's built-in models whose packages import on this machine."""
    from recbole.model.abstract_recommender import AbstractRecommender

    names = []
    for submodule in _RECBOLE_MODEL_SUBMODULES:
        try:
            package = importlib.import_module(f"recbole.model.{submodule}")
        except ImportError:  # exlib_recommender needs lightgbm/xgboost, which are optional
            continue
        module_names = {m.name for m in pkgutil.iter_modules(package.__path__)}
        for attr, obj in vars(package).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, AbstractRecommender)
                and attr.lower() in module_names
                and obj.__module__.startswith("recbole.model.")
            ):
                names.append(attr)
    return sorted(set(names))


def available_models() -> List[str]:
    return sorted(set(builtin_models()) | set(_plugin_models))


def _unknown_model_message(name: str) -> str:
    return (
        f"unknown model {name!r}. Available models: {', '.join(available_models())}. "
        "Model names are case-sensitive (e.g. SASRec, VLM2Rec)."
    )


def check_model_name(name: str) -> None:
    """Raise ``UnknownModelError`` (listing the available models) if ``name`` is not a model, and
    ``MissingPackageError`` (naming the package and its pip command) if it is RecBole's but needs an optional
    package that is not installed."""
    if name in _plugin_models:
        return
    _raise_if_missing_packages(name)
    if name not in builtin_models():
        raise UnknownModelError(_unknown_model_message(name))


# ------------------------------------------------------------------ models that need an optional package
# RecBole 1.2.1 imports some packages that it does not install: at import (exlib_recommender/__init__.py
# imports lightgbm and xgboost for both its models) or inside a method that every run calls (KGAT: dgl;
# KGIN, MCCLK: torch_scatter; NCL: faiss). RecBole then says "No module named 'lightgbm'" for every model
# name it cannot find, or fails deep in a run. What a model needs is read from RecBole's source (the model
# file's imports at any depth, its package's module-level ones), never from a list of model names.

# pip's name where it differs from the import name
PIP_NAMES = {"faiss": "faiss-cpu", "torch_scatter": "torch-scatter", "community": "python-louvain",
             "kmeans_pytorch": "kmeans-pytorch", "sklearn": "scikit-learn", "yaml": "pyyaml"}
# imports in a model file that only one setting's value needs: (model, import) -> (setting, needs it?, wording)
CONDITIONAL_IMPORTS = {
    ("NNCF", "community"): ("neigh_info_method", lambda value: value == "louvain", "neigh_info_method: louvain"),
    ("LDiffRec", "kmeans_pytorch"): ("n_cate", lambda value: isinstance(value, (int, float)) and value > 1,
                                     "n_cate > 1"),
}


class MissingPackageError(UnknownModelError, ConfigError):
    """RecBole's model ``model`` needs optional packages (import names ``packages``) that are not installed.

    It is an ``UnknownModelError`` so that whatever reports an unusable model name reports it (the
    ``run_recbole`` command: exit 2), and a ``ConfigError`` so that a setting that needs a package
    (``setting``, e.g. NNCF's ``neigh_info_method: louvain``), found when a Config is built, is reported as a
    bad setting (exit 1). Its message is one line and never says "unknown model"."""

    def __init__(self, model: str, packages, setting: Optional[str] = None, via: Optional[Dict[str, str]] = None):
        self.model, self.packages, self.setting = model, tuple(packages), setting
        super().__init__(missing_package_message(model, self.packages, setting, via))


def missing_package_message(model: str, packages, setting: Optional[str] = None,
                            via: Optional[Dict[str, str]] = None) -> str:
    names = list(packages)
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    notes = [f"{name}: {where} imports it" for name, where in (via or {}).items() if name in names]
    return (
        f"model {model!r}" + (f" with {setting}" if setting else "")
        + f" needs the optional package{'s' if len(names) > 1 else ''} {listed}, not installed here"
        + (f" ({'; '.join(notes)})" if notes else "")
        + f": pip install {' '.join(PIP_NAMES.get(name, name) for name in names)}"
    )


def recbole_model_source(name: str) -> Optional[Path]:
    """The file that defines RecBole's built-in model ``name`` (``recbole/model/<submodule>/<name.lower()>.py``
    with a class ``name``, where RecBole's ``get_model`` looks), found without importing it; None if RecBole
    has no model of that name."""
    import importlib.util

    for submodule in _RECBOLE_MODEL_SUBMODULES:
        spec = importlib.util.find_spec(f"recbole.model.{submodule}")  # imports recbole.model, not the package
        for location in (spec.submodule_search_locations or ()) if spec else ():
            path = Path(location) / f"{name.lower()}.py"
            if path.is_file() and name in _source_facts(str(path))[0]:
                return path
    return None


@functools.lru_cache(maxsize=None)
def _source_facts(path: str) -> Tuple[frozenset, Tuple[str, ...], Tuple[str, ...]]:
    """(class names, modules imported at any depth, modules imported at module level) of a source file."""
    import warnings

    with warnings.catch_warnings():  # RecBole's docstrings hold invalid escapes ('\p')
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))

    def imported(nodes):
        names = []
        for node in nodes:
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
        return tuple(dict.fromkeys(names))

    classes = frozenset(node.name for node in tree.body if isinstance(node, ast.ClassDef))
    return classes, imported(ast.walk(tree)), imported(tree.body)


def _required_imports(name: str) -> Dict[str, Optional[str]]:
    """Top-level import names RecBole's model ``name`` needs, each with None (its own file imports it) or the
    package that imports it for all its models."""
    path = recbole_model_source(name)
    if path is None:
        return {}
    needed: Dict[str, Optional[str]] = {}
    for module in _source_facts(str(path))[1]:
        needed.setdefault(module.split(".")[0], None)
    package = f"recbole.model.{path.parent.name}"
    init = path.parent / "__init__.py"
    if init.is_file():  # what importing the package runs: its own imports and its modules' module-level ones
        for module in _source_facts(str(init))[2]:
            sibling = path.parent / (module.rpartition(".")[2] + ".py")
            nested = _source_facts(str(sibling))[2] if module.startswith(package + ".") and sibling.is_file() else ()
            for top in [module.split(".")[0], *(m.split(".")[0] for m in nested)]:
                needed.setdefault(top, f"RecBole's {path.parent.name} package")
    return needed


def is_installed(top_level_module: str) -> bool:
    """Whether ``import <top_level_module>`` can find the package (without importing it)."""
    import importlib.util

    return top_level_module in sys.modules or importlib.util.find_spec(top_level_module) is not None


def missing_packages(name: str, config=None) -> Tuple[str, ...]:
    """Import names of the optional packages that RecBole's model ``name`` needs and that are not installed
    (empty for a plugin model, an unknown name, or when nothing is missing). An import that only a setting's
    value needs (``CONDITIONAL_IMPORTS``) counts only when ``config`` (a Config or dict) has that value."""
    if name in _plugin_models:
        return ()
    missing = []
    for top in _required_imports(name):
        if top == "recbole" or is_installed(top):
            continue
        conditional = CONDITIONAL_IMPORTS.get((name, top))
        if conditional is not None:
            setting, needs, _ = conditional
            if config is None or setting not in config or not needs(config[setting]):
                continue
        missing.append(top)
    return tuple(missing)


def check_packages_for_settings(name: str, config) -> None:
    """Raise ``MissingPackageError`` when ``config``'s settings make RecBole's model ``name`` import a
    package that is not installed (``CONDITIONAL_IMPORTS``: NNCF's louvain neighbours, LDiffRec's clusters)."""
    needed = [top for top in missing_packages(name, config) if (name, top) in CONDITIONAL_IMPORTS]
    if needed:
        wording = ", ".join(CONDITIONAL_IMPORTS[(name, top)][2] for top in needed)
        raise MissingPackageError(name, needed, setting=wording)


def _raise_if_missing_packages(model_name: str, error: Optional[BaseException] = None) -> None:
    needed = missing_packages(model_name)
    if (not needed and isinstance(error, ModuleNotFoundError) and error.name
            and not error.name.startswith("recbole") and recbole_model_source(model_name) is not None):
        needed = (error.name.split(".")[0],)  # an import the source scan could not see (a nested module's)
    if needed:
        via = {top: where for top, where in _required_imports(model_name).items() if where and top in needed}
        raise MissingPackageError(model_name, needed, via=via) from error


# ------------------------------------------------------------------ what a model exports and consumes
# Tools that chain runs (vlm2rec-compare) go by these declarations, never by model names. A name stands for
# an artefact: "item_embeddings" (per-modality catalog embeddings, <folder>/item_embeddings.<modality>.npy,
# read through ``feature_prefix``), "discrete_item_features" (the item's token features, read through
# ``selected_features``). A plugin model declares them as class attributes, ``exports`` and ``consumes``
# (tuples of names); RecBole's built-ins cannot, so theirs are here.
MODEL_INPUTS: Dict[str, Tuple[str, ...]] = {
    # RecBole's feature-aware sequential models read the item features listed in ``selected_features``
    "FDSA": ("discrete_item_features",),
    "SASRecF": ("discrete_item_features",),
}
MODEL_OUTPUTS: Dict[str, Tuple[str, ...]] = {}


def model_inputs(name: str) -> Tuple[str, ...]:
    """What model ``name`` reads besides the interactions: its class's ``consumes``, else ``MODEL_INPUTS``."""
    declared = getattr(_plugin_models.get(name), "consumes", None)
    return tuple(declared) if declared is not None else MODEL_INPUTS.get(name, ())


def model_outputs(name: str) -> Tuple[str, ...]:
    """What a run of model ``name`` exports for other runs: its class's ``exports``, else ``MODEL_OUTPUTS``."""
    declared = getattr(_plugin_models.get(name), "exports", None)
    return tuple(declared) if declared is not None else MODEL_OUTPUTS.get(name, ())


def _wrap_get_model(original):
    def get_model(model_name):
        if model_name in _plugin_models:
            return _plugin_models[model_name]
        try:
            model_class = original(model_name)
        except (ValueError, ImportError, AttributeError) as error:
            _raise_if_missing_packages(model_name, error)
            raise UnknownModelError(_unknown_model_message(model_name)) from error
        _raise_if_missing_packages(model_name)  # imports fine, but a method every run calls needs a package
        return model_class

    get_model.__doc__ = original.__doc__
    get_model.__wrapped__ = original
    return get_model


def _load_plugin_properties(config, model: str, dataset: str) -> None:
    """Apply our model and dataset YAML files to a Config's internal (default) dictionary."""
    model_file = _model_property_files.get(model)
    if model_file is not None:
        config._update_internal_config_dict(str(model_file))
    for directory in _dataset_property_dirs:
        dataset_file = directory / f"{dataset}.yaml"
        if dataset_file.is_file():
            loaded = config._update_internal_config_dict(str(dataset_file)) or {}
            # as RecBole does for its own dataset files: these keys decide whether a saved dataset is reusable
            config.parameters["Dataset"] += [k for k in loaded if k not in config.parameters["Dataset"]]
    preset = PROPERTIES_DIR / "quick_start" / f"{model}_on_{dataset}.yaml"
    if preset.is_file():
        config._update_internal_config_dict(str(preset))


def install() -> None:
    """Hook the lookups and the property loading into RecBole (idempotent)."""
    import recbole.config.configurator as configurator
    import recbole.quick_start.quick_start as quick_start
    import recbole.utils
    import recbole.utils.utils

    if getattr(configurator.Config._load_internal_config_dict, "_vlm2rec", False):
        return
    original_load = configurator.Config._load_internal_config_dict

    def _load_internal_config_dict(self, model, model_class, dataset):
        original_load(self, model, model_class, dataset)
        _load_plugin_properties(self, model, dataset)

    _load_internal_config_dict._vlm2rec = True
    configurator.Config._load_internal_config_dict = _load_internal_config_dict

    original_init_device = configurator.Config._init_device

    def _init_device(self):
        # RecBole applies gpu_id here (CUDA_VISIBLE_DEVICES); our torch_num_threads key is applied alongside:
        # small CPU ops slow down badly with more threads than idle cores (30-50x on a busy 2-core machine)
        original_init_device(self)
        threads = self.final_config_dict.get("torch_num_threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))

    configurator.Config._init_device = _init_device

    original_set_default_parameters = configurator.Config._set_default_parameters

    def _set_default_parameters(self):
        # Every source is merged here and nothing is built yet; RecBole's own checks, which come next, raise
        # bare exceptions (or none: most values fail later, deep in a run). See recbole_vlm2rec/settings.py.
        # Then the settings that make a RecBole model import a package that is not installed.
        from recbole_vlm2rec.settings import normalize_list_values, validate_config

        normalize_list_values(self.final_config_dict, self.model)
        validate_config(self.final_config_dict, self.model)
        check_packages_for_settings(self.model, self.final_config_dict)
        original_set_default_parameters(self)

    configurator.Config._set_default_parameters = _set_default_parameters

    wrapped = _wrap_get_model(recbole.utils.utils.get_model)
    for module in (recbole.utils.utils, recbole.utils, configurator, quick_start):
        module.get_model = wrapped
