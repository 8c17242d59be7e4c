"""What a model can read besides the interactions, and how ``vlm2rec-compare`` supplies it.

Models declare input and export names (``registry.model_inputs`` / ``registry.model_outputs``); this module
says, for each name compare knows, through which setting a model reads it and how a run gets it:

* from a producer: another model of the comparison that exports the name; its run of the same seed runs
  first and its exact export is passed as the setting (``plan.Plan.request``);
* otherwise derived inside the child (``settings`` from the merged configuration before the run,
  ``on_dataset`` once the dataset is built), unless the user set the key.

A name compare does not know is left to the user's own settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from logging import getLogger
from typing import Callable, Dict, Optional

# the discrete item features dataset_tools writes into <dataset>.item (RecBole token / token_seq fields)
from dataset_tools.atomic import ITEM_FEATURES as DISCRETE_FEATURES


@dataclass(frozen=True)
class InputKind:
    """One input name: the setting that carries it and how a child derives it when no run produces it."""

    name: str
    label: str       # for messages ("needs the item embeddings of ...")
    config_key: str  # the RecBole setting the consumer reads it from; a user's own value always wins
    # preliminary Config (the user's settings merged) -> config_dict entries for the run
    settings: Optional[Callable[[object], dict]] = None
    # (preliminary Config, run Config, dataset) -> None, after the dataset is built, before the model is
    on_dataset: Optional[Callable[[object, object, object], None]] = None


def _discrete_feature_settings(preliminary) -> dict:
    """``selected_features``: those of the dataset tools' discrete features that ``load_col`` loads for items."""
    load_col = preliminary["load_col"] if isinstance(preliminary["load_col"], dict) else {}
    item_columns = load_col.get("item") or []
    return {"selected_features": [name for name in DISCRETE_FEATURES if name in item_columns]}


def _find_item_embeddings(preliminary, config, dataset) -> None:
    """No run of the comparison exports item embeddings: look where ``run_recbole`` would have exported them.

    That is the user's ``checkpoint_dir`` (``preliminary``), not the run's own folder (``config``), which is
    new and empty. A failure names where it looked (``DataError``)."""
    if config["feature_prefix"] is not None or config["feature_modalities"] == []:
        return
    from recbole_vlm2rec.data.features import modality_list, resolve_feature_prefix
    from recbole_vlm2rec.fusion import MODALITIES

    config["feature_prefix"] = resolve_feature_prefix(
        None, modality_list(config["feature_modalities"], MODALITIES) or list(MODALITIES), preliminary["checkpoint_dir"],
        dataset.dataset_name, dataset.field2id_token[dataset.iid_field],
    )
    getLogger().info(f"feature_prefix: {config['feature_prefix']}")


INPUT_KINDS: Dict[str, InputKind] = {
    kind.name: kind
    for kind in (
        InputKind("item_embeddings", "item embeddings", "feature_prefix", on_dataset=_find_item_embeddings),
        InputKind("discrete_item_features", "discrete item features", "selected_features",
                  settings=_discrete_feature_settings),
    )
}
