"""Typed validation of configuration values: a bad value is a ``ConfigError`` naming the key, the value and
what is allowed, raised before any dataset or model is built.

RecBole reads most values only where it uses them, deep in a run: ``--epochs=abc`` fails in the trainer with
"'<' not supported between instances of 'str' and 'int'", ``--learning_rate=-1`` trains uphill, a misspelt
``learner`` silently falls back to Adam, a misspelt ``eval_args`` key silently falls back to a random split.
``validate_config`` checks the merged configuration once: ``registry.install`` calls it at the start of
``Config._set_default_parameters``, where every source (property files, config files, ``config_dict``, the
command line) is merged, and before RecBole's own checks there (which raise bare exceptions). So the command,
the Python API (``run_recbole(config_dict=...)``) and spawned multi-GPU workers are checked alike.

Values are seen as RecBole's ``Config`` leaves them: YAML types from files; from the command line, the value
of the text when it is a Python literal (``1e-3`` is a float, ``[10, 20]`` a list), ``true``/``false`` as
booleans, and the text itself otherwise (``abc`` stays a string).

What is checked:

* ``RECBOLE_RULES``: the RecBole keys users most often get wrong, for every model; ``eval_args``, ``metrics``
  and ``valid_metric`` have functions of their own (they depend on each other and on the model type);
* ``MODEL_RULES``: the keys our models read that no class of ours checks, only when the model is one of ours;
* the encoder keys (VLM2Rec) and the loss keys (both models) are checked by calling the classes that own
  those rules, ``EncoderConfig`` and ``VLM2RecObjective``, so that each rule lives in one place; their
  ``ValueError``/``TypeError`` becomes a ``ConfigError``.

Messages follow the package's convention, ``<key> must be <what is allowed>, got <value>``.

Why one module of ~430 lines: it is declarative tables of rules plus the few checks that span keys
(``eval_args``, ``metrics``/``valid_metric``); one place to look for what a key accepts.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from recbole_vlm2rec.errors import ConfigError

# ---------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """``accepts(value)``: whether ``value`` is allowed; ``expected``: what is, as said in the message."""

    expected: str
    accepts: Callable[[Any], bool]

    def error(self, key: str, value) -> Optional[str]:
        return None if self.accepts(value) else f"{key} must be {self.expected}, got {value!r}"


def _is_int(value) -> bool:
    # bool is an int subclass: `epochs: true` is a mistake, not 1
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: Optional[int] = None) -> Rule:
    text = "an integer" if minimum is None else f"an integer >= {minimum}"
    return Rule(text, lambda v: _is_int(v) and (minimum is None or v >= minimum))


def number(low: float, high: Optional[float] = None, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number above ``low`` (``> low`` if ``low_open``) and, if given, below ``high``."""
    if high is None:
        text = f"a number {'>' if low_open else '>='} {low}"
    else:
        text = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def accepts(v):
        if not _is_number(v) or v < low or (low_open and v == low):
            return False
        return high is None or v < high or (not high_open and v == high)

    return Rule(text, accepts)


def choice(*options: str, casefold: bool = False) -> Rule:
    """One of ``options`` (compared in lower case with ``casefold``, as RecBole does for ``learner``)."""
    def accepts(v):
        return isinstance(v, str) and (v.lower() if casefold else v) in options

    return Rule("one of " + ", ".join(map(repr, options)), accepts)


def names(options: Sequence[str], single: bool = False) -> Rule:
    """A list of distinct names from ``options`` (``single``: also one name on its own)."""
    def accepts(v):
        if single and isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or len(set(v)) != len(v):
            return False
        return all(isinstance(n, str) and n in options for n in v)

    return Rule(f"a list of names from {list(options)}" + (" (or one name)" if single else ""), accepts)


def optional(rule: Rule) -> Rule:
    """``rule`` or None (``~`` in YAML)."""
    return Rule(f"{rule.expected} or ~ (none)", lambda v: v is None or rule.accepts(v))


BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))


def _positive_ints(v) -> bool:
    return _is_int(v) and v >= 1


TOPK = Rule(
    "a positive integer or a non-empty list of them",
    lambda v: _positive_ints(v) or (isinstance(v, list) and bool(v) and all(_positive_ints(k) for k in v)),
)

# Our models use no sampled negatives: VLM2Rec's are the other rows of a batch (RecBole's pointwise sampling
# would add its negatives as rows that VLM2Rec takes for positives), VLM2RecSASRec trains with CE over all
# items (RecBole rejects sampling for CE, with a bare ValueError).
NO_SAMPLING = Rule(
    "~ (none), or a mapping with distribution: none",
    lambda v: v is None or v == "None" or (isinstance(v, dict) and v.get("distribution") in (None, "none", "None")),
)

# RecBole's trainer builds these optimizers (lower-cased) and silently uses Adam for any other name.
LEARNERS = ("adam", "adamw", "sgd", "adagrad", "rmsprop", "sparse_adam")
# RecBole's FeedForward layer (recbole/model/layers.py) knows these activations; another name is a KeyError.
RECBOLE_ACTIVATIONS = ("gelu", "relu", "swish", "tanh", "sigmoid")

# ------------------------------------------------------------------------------------------------ the tables

# RecBole keys, every model. A key absent from the configuration is not checked.
RECBOLE_RULES: Dict[str, Rule] = {
    "epochs": integer(0),  # 0 trains nothing: VLM2Rec's export of the untrained backbone uses it
    "train_batch_size": integer(1),
    "eval_batch_size": integer(1),
    "learning_rate": number(0, low_open=True),
    "weight_decay": number(0),
    "learner": choice(*LEARNERS, casefold=True),
    "eval_step": integer(),  # <= 0: no validation during training
    "stopping_step": integer(0),
    "topk": TOPK,
    "MAX_ITEM_LIST_LENGTH": integer(1),  # sequential models only (absent otherwise)
    "torch_num_threads": optional(integer(0)),  # ours, any model (registry.py); 0 or ~ = torch's default
}


@lru_cache(maxsize=None)
def _model_rules() -> Dict[str, Dict[str, Rule]]:
    """Keys our models read, per model, other than the encoder and loss keys (checked by their owners).
    Choices come from the modules that use them."""
    from recbole_vlm2rec.data.dataset import TEXT_FIELDS
    from recbole_vlm2rec.data.features import MISSING_ITEM_POLICIES
    from recbole_vlm2rec.fusion import MODALITIES
    from recbole_vlm2rec.models.vlm2rec import FUSIONS
    from recbole_vlm2rec.models.vlm2rec_sasrec import ITEM_INITS

    vlm2rec = {
        "max_history_items": integer(1),
        "fusion": choice(*FUSIONS),
        "modalities": optional(names(MODALITIES, single=True)),  # ~ or [] = every modality
        "item_text_fields": names(TEXT_FIELDS),
        "item_encode_batch_size": integer(1),
        "user_encode_batch_size": integer(1),
        "grad_norm_diagnostics": BOOLEAN,
        "cross_device_negatives": optional(BOOLEAN),  # ~ = on when several processes train
        "contrastive_chunk_size": optional(integer(1)),  # ~ = the whole batch at once (no GradCache)
        "checkpoint_trainable_only": BOOLEAN,
        "enable_amp": BOOLEAN,
        "amp_dtype": choice("bf16", "fp16"),  # the model maps these two; another name turned autocast off silently
        "modality_dropout_eval": BOOLEAN,
        "export_embeddings": BOOLEAN,
        "train_neg_sample_args": NO_SAMPLING,
    }
    vlm2rec_sasrec = {
        # crtr_relation (item only) and "no features and no ID embedding" are checked by the model itself
        "feature_prefix": optional(STRING),
        "missing_item_policy": choice(*MISSING_ITEM_POLICIES),
        "item_init": choice(*ITEM_INITS),
        "adapter_dropout": number(0, 1, high_open=True),
        "use_id_embedding": BOOLEAN,
        "score_temperature": optional(number(0, low_open=True)),
        "alpha": number(0),
        "grad_norm_diagnostics": BOOLEAN,
        "diagnostics_every": integer(1),
        "compile_objective": BOOLEAN,
        "cross_device_negatives": optional(BOOLEAN),
        "loss_type": choice("CE"),
        "train_neg_sample_args": NO_SAMPLING,
        "n_layers": integer(1),
        "n_heads": integer(1),
        "hidden_size": integer(1),
        "inner_size": integer(1),
        "hidden_dropout_prob": number(0, 1),
        "attn_dropout_prob": number(0, 1),
        "hidden_act": choice(*RECBOLE_ACTIVATIONS),
        "layer_norm_eps": number(0, low_open=True),
        "initializer_range": number(0),
    }
    return {"VLM2Rec": vlm2rec, "VLM2RecSASRec": vlm2rec_sasrec}


# The keys VLM2RecObjective.from_settings reads (tests/test_config_validation.py checks that it reads exactly
# these), and `lambda`, which both models pass to it as crtr_weight.
LOSS_KEYS = ("tau", "beta", "wpcl_form", "tau_r", "weak_criterion", "crtr_relation", "weak_ema_momentum", "lambda")

# ---------------------------------------------------------------------------------- rules owned by a class


def _owner_message(key: str, error: Exception) -> str:
    """The owner's message, which says what is allowed and the value; prefixed with the key where it names
    another (VLM2RecObjective names its arguments: ``form`` is ``wpcl_form``)."""
    message = str(error)
    if message.startswith(key) or message.startswith(f"EncoderConfig: '{key}"):
        return message
    return f"{key}: {message}"


def _owner_errors(
    build: Callable[[Mapping], Any], keys: Sequence[str], values: Mapping, background: Mapping
) -> Dict[str, str]:
    """Errors of ``keys``, whose rules live in the class that ``build(mapping)`` constructs (it raises
    ValueError or TypeError on a bad value). Each key is tried on its own among the known-good ``background``
    values, so that each error is charged to its key; then all together, for rules across keys
    (EncoderConfig: train_vision_tower with finetune: frozen)."""
    given = {key: values[key] for key in keys if key in values}
    errors = {}
    for key, value in given.items():
        try:
            build({**background, key: value})
        except (TypeError, ValueError) as error:
            errors[key] = _owner_message(key, error)
    if not errors:
        try:
            build({**background, **given})
        except (TypeError, ValueError) as error:
            errors[", ".join(given)] = str(error)
    return errors


def _encoder_errors(values: Mapping) -> Dict[str, str]:
    from recbole_vlm2rec.encoder.config import EncoderConfig

    keys = [f.name for f in dataclasses.fields(EncoderConfig)]
    return _owner_errors(EncoderConfig.from_dict, keys, values, background={})  # background: the field defaults


@lru_cache(maxsize=None)
def _loss_defaults(model: str) -> Dict[str, Any]:
    """The loss keys' values in the model's default property file (valid by construction: tested)."""
    import yaml

    from recbole_vlm2rec.registry import model_property_file

    with open(model_property_file(model), encoding="utf-8") as handle:
        defaults = yaml.safe_load(handle)
    return {key: defaults[key] for key in LOSS_KEYS}


def _loss_errors(values: Mapping, model: str) -> Dict[str, str]:
    from recbole_vlm2rec.losses import VLM2RecObjective

    def build(settings):
        return VLM2RecObjective.from_settings(settings, crtr_weight=settings["lambda"])

    return _owner_errors(build, LOSS_KEYS, values, _loss_defaults(model))


def _feature_modalities_errors(values: Mapping) -> Dict[str, str]:
    from recbole_vlm2rec.data.features import modality_list
    from recbole_vlm2rec.fusion import MODALITIES

    if "feature_modalities" not in values:
        return {}
    try:
        modality_list(values["feature_modalities"], MODALITIES)
    except ConfigError as error:
        return {"feature_modalities": str(error)}
    return {}


# --------------------------------------------------------------------------------------- eval_args, metrics

# What RecBole's Config._set_default_parameters fills in for the eval_args keys a configuration leaves out
# (an eval_args given in a config file replaces RecBole's whole default dict, e.g. the sequential preset's).
EVAL_ARGS_DEFAULTS = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"}
LEAVE_ONE_OUT_MODES = ("valid_and_test", "valid_only", "test_only")
# full ranking, labeled (given candidates), or N sampled negatives per positive, uniform or by popularity
EVAL_MODE = re.compile(r"(full|labeled|(uni|pop)[1-9][0-9]*)")


def _ratios(v) -> bool:
    # RecBole normalises the three ratios (train, valid, test) by their sum
    return isinstance(v, list) and len(v) == 3 and all(_is_number(r) and r >= 0 for r in v) and sum(v) > 0


def _eval_args_errors(values: Mapping, sequential: bool) -> List[str]:
    if "eval_args" not in values:
        return []
    given = values["eval_args"]
    if not isinstance(given, dict):
        return [f"eval_args must be a mapping with keys split, order, group_by, mode, got {given!r}"]
    errors = []
    unknown = [key for key in given if key not in EVAL_ARGS_DEFAULTS]
    if unknown:
        errors.append(
            f"eval_args has unknown keys {unknown} (RecBole ignores them); its keys are split, order, group_by, mode"
        )
    args = {**EVAL_ARGS_DEFAULTS, **given}

    split = args["split"]
    split_mode, split_arg = next(iter(split.items())) if isinstance(split, dict) and len(split) == 1 else (None, None)
    if split_mode in ("RS", "TS"):
        if not _ratios(split_arg):
            errors.append(
                f"eval_args.split.{split_mode} must be three ratios >= 0 [train, valid, test], got {split_arg!r}"
            )
    elif split_mode == "LS":
        if split_arg not in LEAVE_ONE_OUT_MODES:
            allowed = ", ".join(map(repr, LEAVE_ONE_OUT_MODES))
            errors.append(f"eval_args.split.LS must be one of {allowed}, got {split_arg!r}")
    else:
        errors.append(
            "eval_args.split must be one of {RS: [train, valid, test ratios]}, {TS: [ratios]}, "
            f"{{LS: valid_and_test | valid_only | test_only}}, got {split!r}"
        )

    order = args["order"]
    if order not in ("RO", "TO"):
        errors.append(f"eval_args.order must be one of 'RO', 'TO', got {order!r}")
    elif sequential and order != "TO":
        default = "" if "order" in given else " (RecBole's default when eval_args does not set order)"
        errors.append(f"eval_args.order must be 'TO' for a sequential model, got {order!r}{default}")

    group_by = args["group_by"]
    if not (group_by is None or group_by == "user" or (isinstance(group_by, str) and group_by.lower() == "none")):
        errors.append(f"eval_args.group_by must be one of 'user', 'none', got {group_by!r}")

    mode = args["mode"]  # one mode, or one per phase
    phases = {"eval_args.mode": mode}
    if isinstance(mode, dict):
        phases = {f"eval_args.mode.{phase}": phase_mode for phase, phase_mode in mode.items()}
    if isinstance(mode, dict) and (not mode or any(phase not in ("valid", "test") for phase in mode)):
        errors.append(f"eval_args.mode must be a mode or a mapping with keys valid and/or test, got {mode!r}")
    for where, phase_mode in phases.items():
        if not (isinstance(phase_mode, str) and EVAL_MODE.fullmatch(phase_mode)):
            errors.append(f"{where} must be one of 'full', 'labeled', 'uniN', 'popN' (N >= 1), got {phase_mode!r}")
    return errors


def _metric_errors(values: Mapping) -> List[str]:
    from recbole.evaluator import metric_types
    from recbole.evaluator.register import metrics_dict

    if "metrics" not in values:
        return []
    metrics = values["metrics"]
    listed = [metrics] if isinstance(metrics, str) else metrics
    if not (isinstance(listed, list) and listed and all(isinstance(m, str) for m in listed)):
        return [f"metrics must be a metric name or a non-empty list of them, got {metrics!r}"]
    unknown = [m for m in listed if m.lower() not in metric_types]
    if unknown:
        allowed = sorted(metric.__name__ for metric in metrics_dict.values())
        return [f"metrics must be names from {allowed}, got unknown {unknown}"]
    kinds = {metric_types[m.lower()] for m in listed}
    if len(kinds) > 1:
        return [f"metrics must be all ranking metrics or all value metrics (AUC, LogLoss, MAE, RMSE), got {listed!r}"]

    valid_metric, topk = values.get("valid_metric"), values.get("topk")
    if not isinstance(valid_metric, str):
        return [f"valid_metric must be a metric name such as 'NDCG@10', got {valid_metric!r}"]
    if not TOPK.accepts(topk):
        return []  # reported by RECBOLE_RULES
    # The evaluator reports `name@k` for each k in topk for the metrics built on the top-k list, `name` otherwise;
    # early stopping looks valid_metric up among these (a KeyError after the first epoch if it is not there).
    reported = []
    for metric in listed:
        name = metric.lower()
        if {"rec.topk", "rec.items"} & set(metrics_dict[name].metric_need):
            reported += [f"{name}@{k}" for k in (topk if isinstance(topk, list) else [topk])]
        else:
            reported.append(name)
    if valid_metric.lower() not in reported:
        allowed = ", ".join(reported)
        return [
            f"valid_metric must be one of the metrics reported for metrics and topk ({allowed}), got {valid_metric!r}"
        ]
    return []


# ------------------------------------------------------------------------------- command-line list values

#: Our keys whose value is a list of names. RecBole keeps ``--modalities=[text]`` as the string ``'[text]'``
#: (it evaluates command-line text as a Python literal, and ``[text]`` is not one).
LIST_KEYS = ("modalities", "feature_modalities", "item_text_fields", "lora_target_modules")


def normalize_list_values(values, model: str) -> None:
    """Turn the text a user types for a list of names into that list, in place, for our models' LIST_KEYS:
    ``[text]``, ``[text, image]``, ``['text']`` and ``text,image`` all become lists; ``[]`` the empty list.
    A single name without brackets or commas (``text``) is left as it is (the keys that allow one accept it)."""
    if model not in _model_rules():
        return
    for key in LIST_KEYS:
        value = values.get(key)
        if not isinstance(value, str):
            continue
        text = value.strip()
        bracketed = text.startswith("[") and text.endswith("]")
        if not bracketed and "," not in text:
            continue
        inner = text[1:-1] if bracketed else text
        values[key] = [name.strip().strip("'\"").strip() for name in inner.split(",") if name.strip()]


# ---------------------------------------------------------------------------------------------------- entry


def config_errors(values: Mapping, model: str) -> List[str]:
    """Every problem found in ``values`` (a RecBole ``final_config_dict``) for ``model``, one message each."""
    from recbole.utils import ModelType

    listed = [rule.error(key, values[key]) for key, rule in RECBOLE_RULES.items() if key in values]
    listed = [message for message in listed if message]
    listed += _eval_args_errors(values, sequential=values.get("MODEL_TYPE") == ModelType.SEQUENTIAL)
    listed += _metric_errors(values)

    rules = _model_rules().get(model)
    if rules is None:  # not one of ours: its keys are its own business
        return listed
    ours = {}
    for key, rule in rules.items():
        message = rule.error(key, values[key]) if key in values else None
        if message:
            ours[key] = message
    owners = _loss_errors(values, model)
    if model == "VLM2Rec":
        owners.update(_encoder_errors(values))
    else:
        owners.update(_feature_modalities_errors(values))
    ours.update({key: message for key, message in owners.items() if key not in ours})
    if model == "VLM2RecSASRec" and "hidden_size" not in ours and "n_heads" not in ours:
        # RecBole's MultiHeadAttention raises this when the model is built
        if values["hidden_size"] % values["n_heads"]:
            ours["hidden_size"] = (
                f"hidden_size must be a multiple of n_heads ({values['n_heads']}), got {values['hidden_size']!r}"
            )
    return listed + list(ours.values())


def validate_config(values: Mapping, model: str) -> None:
    """Raise one ``ConfigError`` listing every bad value in ``values`` (see the module docstring)."""
    errors = config_errors(values, model)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} bad settings:\n  " + "\n  ".join(errors))
