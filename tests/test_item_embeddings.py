"""The item-embedding file format's own module: what it imports, the newest-export search, sidecar errors.

Writing and reading round trips are in test_encoder_export.py; VLM2RecSASRec's use of the files (alignment,
damaged arrays) in test_vlm2rec_sasrec.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import recbole_vlm2rec
from recbole_vlm2rec import item_embeddings
from recbole_vlm2rec.data.features import resolve_feature_prefix
from recbole_vlm2rec.errors import DataError
from recbole_vlm2rec.item_embeddings import (
    PAD_TOKEN,
    export_item_embeddings,
    export_prefix,
    load_item_embeddings,
    newest_export,
    read_sidecar,
)

# The modules are imported with the package's __init__ left out: it registers the models (VLM2Rec's module
# imports the encoder), which is not what the two modules below need.
_IMPORTS_CODE = """
import json, sys, types
package = types.ModuleType("recbole_vlm2rec")
package.__path__ = [{package_dir!r}]
sys.modules["recbole_vlm2rec"] = package
before = set(sys.modules)

def new_modules():
    return sorted(set(sys.modules) - before)

import recbole_vlm2rec.item_embeddings
format_imports = new_modules()
import recbole_vlm2rec.data.features
print(json.dumps({{"format": format_imports, "features": new_modules()}}))
"""


def test_format_and_features_modules_import_no_encoder():
    code = _IMPORTS_CODE.format(package_dir=str(Path(recbole_vlm2rec.__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    third_party = {name.split(".")[0] for name in imported["format"]} - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "recbole_vlm2rec"}, third_party  # numpy, json and os only
    assert [m for m in imported["format"] if m.startswith("recbole_vlm2rec.")] == ["recbole_vlm2rec.item_embeddings"]
    for name in ("recbole_vlm2rec.encoder", "transformers", "torch"):
        assert name not in imported["features"], name


def test_encoder_package_re_exports_the_format_functions():
    import recbole_vlm2rec.encoder as encoder

    assert encoder.export_item_embeddings is export_item_embeddings
    assert encoder.load_item_embeddings is load_item_embeddings


def _export(run_dir, tokens, mtime, **metadata):
    prefix = export_prefix(str(run_dir))
    export_item_embeddings(prefix, tokens, {"text": np.ones((len(tokens), 3))}, metadata)
    for suffix in (".text.npy", ".text.json"):
        os.utime(prefix + suffix, (mtime, mtime))
    return prefix


def test_newest_export_of_the_dataset_by_modification_time(tmp_path):
    tokens = ["a", "b", "c"]
    _export(tmp_path / "VLM2Rec-old", tokens, 1_000, dataset="shop")
    newer = _export(tmp_path / "VLM2Rec-new", tokens, 2_000, dataset="shop")
    _export(tmp_path / "VLM2Rec-other", tokens, 3_000, dataset="another-shop")  # newest, of another dataset
    assert newer == str(tmp_path / "VLM2Rec-new" / "item_embeddings")
    assert newest_export(str(tmp_path), "shop", "text", [PAD_TOKEN, *tokens]) == newer
    assert newest_export(str(tmp_path), "shop", "image", tokens) is None  # no image export at all
    assert newest_export(str(tmp_path / "missing"), "shop", "text", tokens) is None


def test_export_naming_no_dataset_is_matched_by_its_items(tmp_path):
    by_hand = _export(tmp_path / "mine", ["a", "b", "c", "d"], 2_000)
    _export(tmp_path / "partial", ["a", "b"], 3_000)  # newer, but lacks items of the dataset
    assert newest_export(str(tmp_path), "shop", "text", [PAD_TOKEN, "a", "b", "c"]) == by_hand
    assert newest_export(str(tmp_path), "shop", "text", ["a", "e"]) is None


def test_unreadable_sidecars_are_named(tmp_path):
    prefix = _export(tmp_path / "run", ["a", "b"], 1_000, dataset="shop")
    assert read_sidecar(prefix + ".text.npy")["dataset"] == "shop"
    assert read_sidecar(str(tmp_path / "nothing.npy")) is None
    for content in ("{not json", "[1, 2]"):
        Path(prefix + ".text.json").write_text(content)
        with pytest.raises(ValueError, match=r"cannot read the feature sidecar .*run/item_embeddings\.text\.json"):
            load_item_embeddings(prefix, "text")
        with pytest.raises(DataError, match="cannot read the feature sidecar"):
            resolve_feature_prefix(None, ["text"], str(tmp_path), "shop", ["a", "b"])


def test_folder_as_feature_prefix_means_its_export(tmp_path):
    expected = os.path.join(str(tmp_path), item_embeddings.EXPORT_STEM)
    assert resolve_feature_prefix(str(tmp_path), ["text"], "unused", "shop", []) == expected
    assert resolve_feature_prefix(expected, ["text"], "unused", "shop", []) == expected  # a prefix as it is


def test_importing_the_feature_loader_through_the_package_loads_no_encoder():
    """As a user does it: the package registers every model, yet reading features never loads the VLM
    encoder (transformers, peft): VLM2Rec imports it when one is built."""
    import subprocess
    import sys

    from helpers import REPO_ROOT

    code = ("import sys, recbole_vlm2rec.data.features\n"
            "print(sorted(m for m in sys.modules if m.startswith(('recbole_vlm2rec.encoder', 'transformers', 'peft'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
