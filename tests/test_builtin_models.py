"""Every RecBole 1.2.1 built-in model trains one epoch and evaluates through our ``run_recbole`` on this stack.

The model list is RecBole's own: each module of ``recbole.model.<general|context_aware|sequential|
knowledge_aware|exlib>_recommender`` that defines a class of the module's name (what RecBole's ``get_model``
resolves), read from RecBole's source, so models whose optional package is missing are listed too. Each one
runs on ``tests/fixtures/tiny-all`` (the 535 interactions of tiny-seq, plus item and user features, a small
knowledge graph with its item links, and 8-d entity and relation vectors for GRU4RecKG and KSR), one thread,
with RecBole's per-type defaults and the few settings RecBole's own model tests give. A model whose optional
package is not installed is skipped, naming the package. Models that load a checkpoint written by an
earlier stage (S3Rec's fine-tuning, ConvNCF, NAIS, RaCT, NeuMF, KD_DAGFM) run that earlier stage first.
"""
import ast
import importlib
import importlib.util
import math
import pkgutil
import warnings
from pathlib import Path

import pytest

import recbole_vlm2rec  # noqa: F401  (the compatibility layer)
from helpers import FIXTURES
from recbole_vlm2rec.registry import MissingPackageError, builtin_models, check_model_name, missing_packages
from recbole_vlm2rec.run import run_recbole

DATASET = "tiny-all"
SUBMODULES = ("general_recommender", "context_aware_recommender", "sequential_recommender",
              "knowledge_aware_recommender", "exlib_recommender")


def recbole_models():
    """{model name: submodule} for every model in RecBole's lookups, from RecBole's source files."""
    models = {}
    for submodule in SUBMODULES:
        spec = importlib.util.find_spec(f"recbole.model.{submodule}")  # does not import the package
        for info in pkgutil.iter_modules(spec.submodule_search_locations):
            source = Path(spec.submodule_search_locations[0]) / f"{info.name}.py"
            with warnings.catch_warnings():  # RecBole's docstrings hold invalid escapes ('\p')
                warnings.simplefilter("ignore", SyntaxWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                tree = ast.parse(source.read_text(encoding="utf-8"))
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name.lower() == info.name:
                    models[node.name] = submodule
    return models


MODELS = recbole_models()

_INTER = ["user_id", "item_id", "rating", "timestamp"]
_FEATURES = {"inter": _INTER, "item": ["item_id", "class", "price", "brand"], "user": ["user_id", "age", "gender"]}
# float features are embedded only when listed in numerical_features (DSSM's towers assume they are)
_CONTEXT = {"load_col": _FEATURES, "threshold": {"rating": 4}, "numerical_features": ["age", "price"]}
_BY_SUBMODULE = {
    "general_recommender": {"load_col": {"inter": _INTER}},
    "context_aware_recommender": _CONTEXT,
    "exlib_recommender": _CONTEXT,
    "sequential_recommender": {"load_col": {"inter": _INTER, "item": ["item_id", "class", "price", "brand"]},
                               "MAX_ITEM_LIST_LENGTH": 10},
    "knowledge_aware_recommender": {},  # RecBole's knowledge_base.yaml loads .inter, .kg and .link
}
_KG_EMBEDDINGS = {  # GRU4RecKG and KSR read pretrained entity (and relation) vectors
    "load_col": {"inter": _INTER, "kg": ["head_id", "relation_id", "tail_id"], "link": ["item_id", "entity_id"],
                 "ent": ["ent_id", "ent_emb"], "rel": ["rel_id", "rel_emb"]},
    "additional_feat_suffix": ["ent", "rel"],
    "alias_of_entity_id": ["ent_id"],
    "alias_of_relation_id": ["rel_id"],
    "preload_weight": {"ent_id": "ent_emb", "rel_id": "rel_emb"},
    # RecBole's sequential_embedding_model.yaml has no eval_args; a sequential dataset needs these
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
    "embedding_size": 8,
    "kg_embedding_size": 8,
}
# RecBole's own model tests give these (tests/model/test_model_auto.py), or the model needs them here
_BY_MODEL = {
    "Caser": {"reproducibility": False},
    "NextItNet": {"reproducibility": False},
    "SRGNN": {"MAX_ITEM_LIST_LENGTH": 3},
    "GCSAN": {"MAX_ITEM_LIST_LENGTH": 3},
    "KTUP": {"train_rec_step": 1, "train_kg_step": 1},
    "GRU4RecCPR": {"reranker_CAN_NUM": 20},  # a reranker partition of 100 items needs 100 items
    "SASRecCPR": {"reranker_CAN_NUM": 20},
    "NCL": {"num_clusters": 10},
    "GRU4RecKG": _KG_EMBEDDINGS,
    "KSR": _KG_EMBEDDINGS,
    "RaCT": {"pretrain_epochs": 1, "save_step": 1},  # its default stage, actor_pretrain
    "S3Rec": {"item_attribute": "class", "pretrain_epochs": 2, "save_step": 1},
    "LightGBM": {"lgb_params": {"boosting": "gbdt", "objective": "binary", "metric": ["auc", "binary_logloss"]},
                 "lgb_num_boost_round": 1},
    "XGBoost": {"xgb_params": {"booster": "gbtree", "objective": "binary:logistic", "eval_metric": ["auc", "logloss"]},
                "xgb_num_boost_round": 1},
}


def config_for(name, tmp_path, **overrides):
    config = {
        "data_path": str(FIXTURES),
        "checkpoint_dir": str(tmp_path / "saved"),
        "gpu_id": "",
        "show_progress": False,
        "state": "WARNING",
        "torch_num_threads": 1,
        "epochs": 1,
        "train_batch_size": 256,
        "eval_batch_size": 4096,
    }
    config.update(_BY_SUBMODULE[MODELS[name]])
    config.update(_BY_MODEL.get(name, {}))
    config.update(overrides)
    return config


def _skip_if_missing_packages(name):
    missing = missing_packages(name)
    if missing:
        with pytest.raises(MissingPackageError) as error:
            check_model_name(name)
        pytest.skip(f"optional package not installed: {str(error.value)}")


def _run(name, tmp_path, **overrides):
    result = run_recbole(name, DATASET, config_dict=config_for(name, tmp_path, **overrides))
    assert result["model"] == name
    assert result["test_result"], f"{name} reported no test metrics"
    for metric, value in result["test_result"].items():
        assert isinstance(value, float) and math.isfinite(value), (metric, value)
    return result


def test_model_list_is_recbole_lookups():
    """The list is every class RecBole's get_model finds: all importable ones are recommenders (the names
    ``registry.builtin_models`` derives from the packages), plus the exlib models."""
    from recbole.model.abstract_recommender import AbstractRecommender
    from recbole.utils import get_model

    importable = set(builtin_models())
    assert importable <= set(MODELS) and len(importable) >= 90
    for name in importable:
        assert issubclass(get_model.__wrapped__(name), AbstractRecommender)
    assert {"LightGBM", "XGBoost"} <= set(MODELS) - importable or not missing_packages("LightGBM")


@pytest.mark.parametrize("name", sorted(MODELS, key=lambda n: (MODELS[n], n.lower())))
def test_builtin_model_trains_and_evaluates(name, tmp_path):
    _skip_if_missing_packages(name)
    if name == "S3Rec":  # pretrain a few epochs (saving every epoch), then fine-tune from the last one
        pretrained = _run(name, tmp_path, train_stage="pretrain")
        assert Path(pretrained["saved_model_file"]).name == f"S3Rec-{DATASET}-2.pth"
        _run(name, tmp_path, train_stage="finetune", pre_model_path=pretrained["saved_model_file"])
    else:
        _run(name, tmp_path)


# (model, first stage settings, second stage settings as a function of the first stage's checkpoint)
WARM_STARTS = {
    "ConvNCF": ("BPR", {}, lambda path: {"train_method": "after_pretrain", "pre_model_path": path}),
    "NAIS": ("FISM", {"embedding_size": 16}, lambda path: {"pretrain_path": path, "embedding_size": 16}),
    "NeuMF": ("NeuMF", {"mlp_train": False}, lambda path: {"use_pretrain": True, "mf_pretrain_path": path,
                                                            "mlp_pretrain_path": path}),
    "RaCT": ("RaCT", {}, lambda path: {"train_stage": "critic_pretrain", "pre_model_path": path,
                                       "metrics_k": 10}),  # its NDCG@100 critic needs 100 items
    "KD_DAGFM": ("KD_DAGFM", {}, lambda path: {"phase": "distillation", "warm_up": path}),
}


@pytest.mark.parametrize("name", sorted(WARM_STARTS))
def test_model_warm_starts_from_a_recbole_checkpoint(name, tmp_path):
    """The pretrain / warm-start paths that call ``torch.load`` in the model's own module read RecBole's
    checkpoint through the safe loader (torch >= 2.6 refuses them otherwise)."""
    first_model, first, second = WARM_STARTS[name]
    _skip_if_missing_packages(first_model)
    checkpoint = _run(first_model, tmp_path / "first", **first)["saved_model_file"]
    assert Path(checkpoint).is_file()
    _run(name, tmp_path / "second", **second(checkpoint))
