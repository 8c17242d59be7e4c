"""Safe loading of RecBole checkpoints (sections 3, 9 and 11 of ``recbole_vlm2rec.compat``).

``load_checkpoint`` is ``torch.load`` with a restricted unpickler whose allow-list is what RecBole's own
checkpoints hold; RecBole's trainer and the models that read checkpoints themselves see a ``torch`` whose
``load`` is it. A damaged file is a ``CorruptCheckpointError`` naming it.
"""
from __future__ import annotations

import importlib
import os
import pickle
import types
from typing import Any

import torch

from recbole_vlm2rec.errors import DataError


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
    if not config["single_spec"] and not torch.distributed.is_initialized():
        # saved by a run_recbole --nproc run: loaded here by one process, whose data loaders must not
        # split the data between processes that do not exist (torch's DistributedSampler needs a group)
        config["single_spec"] = True
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


# --- 9. checkpoints that models read themselves ----------------------------------------------------
# RecBole 1.2.1 modules (besides the trainer and quick start, section 3) that call ``torch.load``
MODEL_MODULES_LOADING_CHECKPOINTS = (
    "recbole.model.sequential_recommender.s3rec",  # train_stage: finetune, pre_model_path
    "recbole.model.general_recommender.convncf",  # train_method: after_pretrain, pre_model_path (a BPR's)
    "recbole.model.general_recommender.nais",  # pretrain_path (a FISM's)
    "recbole.model.general_recommender.ract",  # train_stage: critic_pretrain / finetune, pre_model_path
    "recbole.model.general_recommender.neumf",  # use_pretrain, mf_pretrain_path, mlp_pretrain_path
    "recbole.model.context_aware_recommender.kd_dagfm",  # phase: distillation / finetuning, warm_up
)


def _install_safe_checkpoint_loading_in_models() -> None:
    for module_name in MODEL_MODULES_LOADING_CHECKPOINTS:
        importlib.import_module(module_name).torch = _TorchWithSafeCheckpointLoad()


# --- 11. more of what RecBole checkpoints hold -----------------------------------------------------
# Found by training every built-in model through ``run_recbole`` (tests/test_builtin_models.py): EASE keeps
# its item-item matrix as a ``numpy.matrix``, RippleNet its ripple sets in a ``collections.defaultdict(list)``
# (the factory ``list`` is pickled by name). Classes only, as the rest of the allow-list.
_ALLOWED_CHECKPOINT_GLOBALS = _ALLOWED_CHECKPOINT_GLOBALS | {
    "numpy.matrix",
    "collections.defaultdict",
    "builtins.list",
}
