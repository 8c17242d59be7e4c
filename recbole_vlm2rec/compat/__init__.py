"""Compatibility layer: RecBole 1.2.1 on numpy 2.x, torch >= 2.6 and today's Python stack.

RecBole 1.2.1 (the latest release) was written for numpy 1.x and torch < 2.6. Every patch below is
applied once, by ``apply()``, when ``recbole_vlm2rec`` is imported, and each one says why it exists.
No RecBole file is edited: we only add missing names, wrap functions and swap module-level references.
The checkpoint patches (3, 9, 11) live in ``checkpoints.py``, the graph one (8) in ``graph.py``, the distributed one (14) in ``distributed.py``; the small
ones here.

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
8. Graph adjacency matrices. LightGCN, NGCF, NCL, GCMC, SpectralCF, KGIN and MCCLK build their normalized
   user-item adjacency in a ``scipy.sparse.dok_matrix`` filled with ``A._update(data_dict)``, a private method
   that scipy 1.13 removed (RecBole issue #2034): every one of them fails in its constructor. Their methods
   (``get_norm_adj_mat``, ``get_laplacian_matrix``, ``get_norm_inter_matrix``) are replaced by vectorised
   equivalents (numpy on the interaction matrix's coordinates, no Python loop over interactions, no
   dok_matrix) that return the identical matrices, value for value and in the same dtypes, 20-30x faster
   than RecBole's own on 1M interactions (benchmarks/adjacency_build.py). ``ORIGINAL_ADJACENCY_METHODS``
   keeps RecBole's own.
9. Checkpoints read by models. S3Rec's fine-tuning (``pre_model_path``), ConvNCF (``after_pretrain``), NAIS
   (``pretrain_path``), RaCT (``critic_pretrain``, ``finetune``), NeuMF (``use_pretrain``) and KD_DAGFM
   (``warm_up``) call ``torch.load`` on a RecBole checkpoint themselves, which torch >= 2.6 refuses. Their
   modules see the same ``torch`` as RecBole's trainer (section 3): its ``load`` is ``load_checkpoint``, with
   the same allow-list. The files they read are RecBole's own checkpoints, full ones (the trainer's, or
   ``PretrainTrainer.save_pretrained_model``'s: config, state_dict, optimizer state, ...).
10. Optional packages that a setting needs. NNCF imports python-louvain (``community``) only with
   ``neigh_info_method: louvain``, LDiffRec ``kmeans_pytorch`` only with ``n_cate > 1``: without the package
   such a run fails after loading the data. Not a patch here: ``registry`` checks it with the other settings
   when a Config is built (``registry.MissingPackageError``, a ``ConfigError``, names the setting, the package
   and its pip command). Models that always need a package are refused by name (``registry``'s ``get_model``).
11. More checkpoint globals: EASE's ``numpy.matrix``, RippleNet's ``collections.defaultdict(list)`` (found
   by running every built-in model through ``run_recbole``), added to section 3's allow-list.
12. FLOPs. RecBole's quick start counts FLOPs with ``model.predict``, which GRU4RecCPR and SASRecCPR refuse
   (``assert False``: they rank only the full catalog), so they never reach training; their FLOPs are
   reported as ``None``, with a warning.
13. KSR. Its pretrained relation vectors stay float64 (RecBole preloads vectors with ``np.zeros``) and meet
   float32 activations: no KSR run gets past its first batch. They are cast to the model's dtype.
14. Distributed training on CPUs (``distributed.py``). RecBole's ``--nproc`` path hard-codes NCCL and CUDA
   devices; with ``gpu_id: ''`` (or without CUDA) the processes join a ``gloo`` group on the CPU instead, and
   the model is wrapped in ``DistributedDataParallel`` without ``device_ids``. On both back-ends, evaluation
   gathers every process's per-sample rows and computes the metrics once (equal to one process's).
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np
import torch

from .checkpoints import (  # noqa: F401  (re-exported: the package's public names)
    MODEL_MODULES_LOADING_CHECKPOINTS,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    _install_safe_checkpoint_loading,
    _install_safe_checkpoint_loading_in_models,
    allow_model_class_in_checkpoints,
    load_checkpoint,
    load_data_and_model,
)
from .distributed import _cpu_distributed_training
from .graph import _ADJACENCY_REPLACEMENTS, ORIGINAL_ADJACENCY_METHODS, _vectorised_graph_adjacency  # noqa: F401

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


# --- 12. FLOPs of models that only score the whole catalog, or that hold peft wrappers ---------------
def _attribute_forwarder(model):
    """The first submodule whose class forwards unknown attribute lookups (peft's ``PeftModel`` and
    ``LoraModel`` forward them to the model they wrap), or None."""
    return next((m for m in model.modules() if type(m).__getattr__ is not torch.nn.Module.__getattr__), None)


def _flops_without_predict() -> None:
    """RecBole's quick start counts FLOPs by running ``model.predict`` on one interaction; GRU4RecCPR and
    SASRecCPR refuse ``predict`` (``assert False``: they only rank the full item set), so every run of them
    through RecBole's ``run_recbole`` stops before training. Such a model gets ``None`` FLOPs and a warning.

    The counter (thop) registers a ``total_ops`` buffer on every submodule, children first: on a module that
    forwards attribute lookups (VLM2Rec with ``finetune: lora``: peft's wrappers) the name already resolves
    to the wrapped child's buffer, ``register_buffer`` raises ``KeyError``, and the run stopped there with
    thop's buffers left on the children. Such a model is not counted either (logged)."""
    import recbole.utils
    import recbole.utils.utils as utils_module

    original = utils_module.get_flops

    def get_flops(model, dataset, device, logger, transform, verbose=False):
        forwarder = _attribute_forwarder(model)
        if forwarder is not None:
            logger.info(f"FLOPs not counted: {type(model).__name__} holds a {type(forwarder).__name__}, which "
                        "forwards attribute lookups, where RecBole's FLOPs counter (thop) cannot add its buffers")
            return None
        try:
            return original(model, dataset, device, logger, transform, verbose)
        except (AssertionError, NotImplementedError) as error:
            logger.warning(f"FLOPs not counted: {type(model).__name__}.predict raised "
                           f"{type(error).__name__} (the model scores only the full item set)")
            return None

    get_flops.__wrapped__ = original
    utils_module.get_flops = get_flops
    recbole.utils.get_flops = get_flops
    import recbole.quick_start.quick_start as quick_start_module

    quick_start_module.get_flops = get_flops


# --- 13. KSR's relation vectors in the model's dtype -----------------------------------------------
def _ksr_relation_matrix_dtype() -> None:
    """KSR keeps the pretrained relation vectors as ``torch.from_numpy`` of RecBole's preloaded matrix,
    which ``Dataset._preload_weight_matrix`` builds with ``np.zeros`` (float64), and multiplies them with
    float32 activations: every KSR run stops at its first batch ("expected m1 and m2 to have the same
    dtype"). The matrix is cast to the entity embedding's dtype after ``__init__``."""
    from recbole.model.sequential_recommender.ksr import KSR

    original = KSR.__init__

    def __init__(self, config, dataset):
        original(self, config, dataset)
        self.relation_Matrix = self.relation_Matrix.to(self.entity_embedding.weight.dtype)

    KSR.__init__ = __init__


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
    _vectorised_graph_adjacency()
    _install_safe_checkpoint_loading_in_models()
    _flops_without_predict()
    _ksr_relation_matrix_dtype()
    _cpu_distributed_training()
    _APPLIED = True
