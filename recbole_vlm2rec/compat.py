"""Compatibility layer: RecBole 1.2.1 on numpy 2.x, torch >= 2.6 and today's Python stack.

RecBole 1.2.1 (the latest release) was written for numpy 1.x and torch < 2.6. Every patch below is
applied once, by ``apply()``, when ``recbole_vlm2rec`` is imported, and each one says why it exists.
No RecBole file is edited: we only add missing names, wrap functions and swap module-level references.

1. numpy aliases. numpy 2 removed ``np.float_``, ``np.complex_``, ``np.unicode_`` and ``np.bool8``, and
   numpy 1.24 the builtin aliases ``np.float``, ``np.int``, ``np.object``, ``np.str``, ``np.complex``,
   ``np.unicode``. RecBole uses the first three (every ``Config()`` breaks), ray 2.6.3 (imported by RecBole's
   quick start) ``bool8``, and RecBole's metrics (NDCG: ``np.float``) the builtin ones, which RecBole's own
   ``Config.compatibility_settings`` restores only when a ``Config`` is built: a reloaded model
   (``load_data_and_model`` unpickles the Config) or a spawned worker has none. We add them all back, at
   import, only where missing, as RecBole's ``compatibility_settings`` defines them.
2. Autograd anomaly mode. ``recbole/model/sequential_recommender/sine.py`` calls
   ``torch.autograd.set_detect_anomaly(True)`` at import time, and that module is imported by every
   sequential model's lookup: training gets ~2.2x slower for every model (see benchmarks/recbole_overhead.py).
   We import the package once and switch the flag back off.
3. Checkpoint loading. torch >= 2.6 loads with ``weights_only=True`` by default, and RecBole's checkpoints
   pickle its ``Config`` object (and the model class, a few enums, a yaml loader class), so reloading the best
   model after ``fit``, ``resume_checkpoint`` and ``load_data_and_model`` all fail. We keep torch's protection
   on: ``load_checkpoint`` lists the globals a checkpoint needs, allows exactly those RecBole's own checkpoints
   hold (the allow-list below: a few named globals, classes (never functions) from RecBole, torch.nn and
   scipy.sparse, and classes registered with this plugin), refuses anything else with ``UnsafeCheckpointError``. torch's weights-only unpickler cannot be used for this: it
   rejects pickle protocol 4, which RecBole writes; so the same allow-list is enforced by a restricted
   unpickler for that one call. RecBole's trainer module sees a ``torch`` whose ``load`` is
   ``load_checkpoint``; ``torch.load``'s weights-only default stays on for the rest of the process.
4. CE models and the default negative sampling. ``overall.yaml`` sets ``train_neg_sample_args`` to uniform
   sampling, and ``Config`` then refuses every model with ``loss_type: CE`` (SASRec, BERT4Rec, ...) unless the
   user writes ``train_neg_sample_args: ~``: ``run_recbole --model=SASRec`` fails out of the box. When the
   loss is CE and the user set no ``train_neg_sample_args`` anywhere, we use ``None`` (no sampling), the only
   value RecBole accepts there; a value the user sets is left for RecBole to judge.
5. Noise on every run: ray 2.6.3 (imported by RecBole's quick start) imports ``pkg_resources``, whose
   deprecation warning is silenced (``setuptools<81`` is pinned so that the module still exists); pandas 2.x
   and torch warn about deprecated calls in RecBole's own code (in-place ``fillna`` on a column, a no-op only
   from pandas 3, which is why ``pandas<3`` is pinned; ``Series.agg(len)``; ``torch.cuda.amp.GradScaler``):
   FutureWarnings raised from RecBole's modules are silenced, ours and everyone else's stay visible.
6. Checkpoint names. RecBole names a checkpoint ``<Model>-<time to the second>.pth``: two runs started in
   the same second into one ``checkpoint_dir`` overwrite each other's file (and VLM2Rec's export folder).
   Every ``Trainer`` gets a name with a random suffix that no file or folder has (``unique_checkpoint_path``).
7. Metric values. Under numpy 2 RecBole's metrics are ``np.float64`` and its result lines print
   ``np.float64(0.0421)``; the evaluator's results are turned into Python floats.
"""
from __future__ import annotations

import importlib
import os
import pickle
import types
import warnings
from typing import Any

import numpy as np
import torch

from recbole_vlm2rec.errors import DataError

_APPLIED = False

# --- 1. numpy aliases ------------------------------------------------------------------------------
_NUMPY_ALIASES = {
    "float_": "float64", "complex_": "complex128", "unicode_": "str_", "bool8": "bool_",
    # RecBole's Config.compatibility_settings
    "bool": "bool_", "int": "int_", "float": "float64", "complex": "complex128", "object": "object_",
    "str": "str_", "long": "int_", "unicode": "str_",
}


def _add_numpy_aliases() -> None:
    for old, new in _NUMPY_ALIASES.items():
        if old not in np.__dict__:  # np.__getattr__ raises for removed names; look at the real namespace
            setattr(np, old, getattr(np, new))


# --- 2. anomaly mode -------------------------------------------------------------------------------
def _undo_sine_anomaly_mode() -> None:
    importlib.import_module("recbole.model.sequential_recommender")  # runs sine.py's side effect now
    torch.autograd.set_detect_anomaly(False)


# --- 3. safe checkpoint loading --------------------------------------------------------------------
class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs a Python object that RecBole's own checkpoints never hold."""


class CorruptCheckpointError(DataError):
    """A checkpoint file is truncated, damaged or not a checkpoint at all."""


# The non-class globals and classes outside the modules below that RecBole 1.2.1 checkpoints
# (``Trainer._save_checkpoint``) pickle: the Config object and what its dicts hold, numpy arrays, and what
# some models keep as attributes (FDSA/SASRecF pickle their feature layers, which hold the dataset and a
# logger). Found by saving checkpoints of built-in and plugin models and listing their pickles' globals.
_ALLOWED_CHECKPOINT_GLOBALS = frozenset(
    {
        "recbole.config.configurator.Config",
        "recbole.utils.enum_type.ModelType",
        "recbole.utils.enum_type.InputType",
        "recbole.utils.enum_type.EvaluatorType",
        "recbole.utils.enum_type.FeatureType",
        "recbole.utils.enum_type.FeatureSource",
        "yaml.loader.FullLoader",
        "torch.device",
        "collections.OrderedDict",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
        "numpy.dtypes.Float64DType",
        "numpy.dtypes.Int64DType",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "logging.getLogger",
    }
)
# Classes (never functions) from these modules: RecBole's own data containers, layers and enums, torch's
# nn modules that models keep as attributes, scipy sparse matrices (EASE, SLIMElastic, ... keep them).
_ALLOWED_CLASS_MODULE_PREFIXES = ("recbole.", "torch.nn.modules.", "scipy.sparse.")

# Recommender classes registered by this plugin (filled by recbole_vlm2rec.registry).
_registered_model_classes: dict = {}


def allow_model_class_in_checkpoints(model_class: type) -> None:
    """Let checkpoints that name ``model_class`` (a registered plugin model) load."""
    _registered_model_classes[f"{model_class.__module__}.{model_class.__qualname__}"] = model_class


def _resolve_allowed_global(name: str) -> Any:
    """Return the object for a global a checkpoint needs, or raise if RecBole checkpoints never hold it."""
    if name in _registered_model_classes:
        return _registered_model_classes[name]
    module_name, _, attr = name.rpartition(".")
    if name in _ALLOWED_CHECKPOINT_GLOBALS:
        return getattr(importlib.import_module(module_name), attr)
    if module_name.startswith(_ALLOWED_CLASS_MODULE_PREFIXES):
        # e.g. the recommender class: RecBole stores ``config.model_class`` in every checkpoint
        obj = getattr(importlib.import_module(module_name), attr, None)
        if isinstance(obj, type):
            return obj
    raise UnsafeCheckpointError(
        f"refusing to load a checkpoint that needs the Python object '{name}': RecBole checkpoints never hold "
        "it, and unpickling arbitrary objects can run code. If you trust this file and it was written by a "
        "plugin model, import the package that registers that model first."
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allowed globals (the restricted unpickler of Python's pickle docs).

    torch's own weights-only unpickler would be the natural choice, but it rejects pickle protocol 4
    (FRAME, MEMOIZE opcodes), which RecBole's ``torch.save(..., pickle_protocol=4)`` writes. torch hands
    storages to its own loader before this method is asked; everything else must pass the allow-list.
    """

    def find_class(self, module: str, name: str) -> Any:
        full_name = f"{module}.{name}"
        torch_allowed = _get_torch_allowed_globals()
        if full_name in torch_allowed:  # tensor rebuild helpers, dtypes, OrderedDict, ...
            return torch_allowed[full_name]
        return _resolve_allowed_global(full_name)


def _get_torch_allowed_globals() -> dict:
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


_restricted_pickle = types.ModuleType("recbole_vlm2rec_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()


def load_checkpoint(f, map_location=None, **kwargs):
    """``torch.load`` for RecBole checkpoints that unpickles only what RecBole's own checkpoints hold.

    torch's weights-only default is not switched off anywhere: this call alone uses a restricted unpickler
    whose allow-list is torch's weights-only list plus the RecBole types above and recommender classes
    (RecBole's or registered with this plugin). Anything else raises ``UnsafeCheckpointError`` before the
    object is created.
    """
    import zipfile

    kwargs.pop("weights_only", None)  # RecBole passes none; a caller's True/False is replaced by our policy
    path = os.fspath(f)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head[:1] == b"\x80":  # a pickle stream: torch.save's format before torch 1.6
            raise UnsafeCheckpointError(
                f"{path} is a legacy (pre-zip) torch checkpoint; only zip checkpoints (torch.save's default "
                "since torch 1.6, what RecBole writes) are loaded"
            )
        raise CorruptCheckpointError(
            f"{path} is not a readable torch checkpoint: it is "
            + ("a truncated or damaged zip file" if head == b"PK\x03\x04" else "empty" if not head else
               "not a zip file at all")
            + " (an interrupted save or copy, or another kind of file); use another checkpoint or train again"
        )
    try:
        return torch.load(path, map_location=map_location, pickle_module=_restricted_pickle, weights_only=False,
                          **kwargs)
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # whatever a damaged zip or pickle makes torch's reader or pickle raise

        raise CorruptCheckpointError(
            f"{path} is a damaged torch checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "use another checkpoint or train again"
        ) from None


class _TorchWithSafeCheckpointLoad(types.ModuleType):
    """The ``torch`` module as seen by RecBole's trainer: everything is torch's, except ``load``."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.load = load_checkpoint

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def load_data_and_model(model_file):
    """RecBole's ``load_data_and_model`` with safe checkpoint loading (same steps, same return value).

    Returns ``(config, model, dataset, train_data, valid_data, test_data)``.
    """
    from logging import getLogger

    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_logger, init_seed

    checkpoint = load_checkpoint(model_file)
    config = checkpoint["config"]
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def _install_safe_checkpoint_loading() -> None:
    import recbole.quick_start
    import recbole.quick_start.quick_start as quick_start_module
    import recbole.trainer.trainer as trainer_module

    trainer_module.torch = _TorchWithSafeCheckpointLoad()
    quick_start_module.load_data_and_model = load_data_and_model
    recbole.quick_start.load_data_and_model = load_data_and_model


# --- 4. CE models and default negative sampling ---------------------------------------------------
def _default_no_sampling_for_ce_models() -> None:
    from recbole.config.configurator import Config

    original = Config._set_default_parameters

    def _set_default_parameters(self):
        final = self.final_config_dict
        if final.get("loss_type") == "CE" and "train_neg_sample_args" not in self.external_config_dict:
            final["train_neg_sample_args"] = None
        original(self)

    Config._set_default_parameters = _set_default_parameters


# --- 6. unique checkpoint names ------------------------------------------------------------------
def unique_checkpoint_path(checkpoint_dir: str, model_name: str) -> str:
    """``<checkpoint_dir>/<Model>-<local time>-<6 random hex>.pth``, a name no file or folder has yet.

    RecBole names checkpoints by the second: two runs started together overwrite each other's checkpoint
    (and VLM2Rec's export folder, named after it). Under torch.distributed every rank must use rank 0's
    name (rank 0 saves, every rank reloads the best model), so it is broadcast.
    """
    import secrets

    from recbole.utils import get_local_time

    while True:
        stem = f"{model_name}-{get_local_time()}-{secrets.token_hex(3)}"
        path = os.path.join(checkpoint_dir, stem + ".pth")
        if not os.path.exists(path) and not os.path.exists(os.path.join(checkpoint_dir, stem)):
            break
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [path]
        torch.distributed.broadcast_object_list(shared, src=0)
        path = shared[0]
    return path


def _unique_checkpoint_names() -> None:
    from recbole.trainer.trainer import Trainer

    original = Trainer.__init__

    def __init__(self, config, model):
        original(self, config, model)
        self.saved_model_file = unique_checkpoint_path(self.checkpoint_dir, config["model"])

    Trainer.__init__ = __init__


# --- 7. metric values as Python floats -----------------------------------------------------------
def _metric_values_as_floats() -> None:
    """numpy 2 prints ``np.float64(0.0421)`` where numpy 1 printed ``0.0421``: RecBole's result lines
    (``test result: OrderedDict([('ndcg@10', np.float64(0.0421))])``) become hard to read and to parse."""
    from recbole.evaluator.evaluator import Evaluator

    original = Evaluator.evaluate

    def evaluate(self, dataobject):
        result = original(self, dataobject)
        for key, value in result.items():
            if isinstance(value, np.floating):
                result[key] = float(value)
        return result

    Evaluator.evaluate = evaluate


def apply() -> None:
    """Apply every patch once (idempotent). Called on ``import recbole_vlm2rec``."""
    global _APPLIED
    if _APPLIED:
        return
    _add_numpy_aliases()
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    _undo_sine_anomaly_mode()
    _default_no_sampling_for_ce_models()
    _install_safe_checkpoint_loading()
    _unique_checkpoint_names()
    _metric_values_as_floats()
    _APPLIED = True
