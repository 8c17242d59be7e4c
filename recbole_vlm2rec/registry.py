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
sets its defaults: a bad value is a ``ConfigError`` naming the key, the value and what is allowed.

An unknown model name makes RecBole fail with "No module named 'lightgbm'" (the probe reaches the optional
``exlib_recommender`` package); ``get_model`` is wrapped to name the model and list the available ones.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from recbole_vlm2rec import compat


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


def register_dataset_properties(directory: os.PathLike) -> None:
    """Also read ``<directory>/<dataset>.yaml`` as a dataset's default properties."""
    _dataset_property_dirs.append(Path(directory))


def plugin_models() -> Dict[str, type]:
    return dict(_plugin_models)


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
    """Raise ``UnknownModelError`` (listing the available models) if ``name`` is not a model."""
    if name not in _plugin_models and name not in builtin_models():
        raise UnknownModelError(_unknown_model_message(name))


def _wrap_get_model(original):
    def get_model(model_name):
        if model_name in _plugin_models:
            return _plugin_models[model_name]
        try:
            return original(model_name)
        except (ValueError, ImportError, AttributeError) as error:
            raise UnknownModelError(_unknown_model_message(model_name)) from error

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
        from recbole_vlm2rec.settings import validate_config

        validate_config(self.final_config_dict, self.model)
        original_set_default_parameters(self)

    configurator.Config._set_default_parameters = _set_default_parameters

    wrapped = _wrap_get_model(recbole.utils.utils.get_model)
    for module in (recbole.utils.utils, recbole.utils, configurator, quick_start):
        module.get_model = wrapped
