"""VLM2RecSASRec: SASRec equivalence, feature loading and its errors, training on the demo through run_recbole."""
import json
import re
import sys

import numpy as np
import pytest
import torch

import recbole_vlm2rec  # noqa: F401  (registers the models)
from helpers import FIXTURES, run_cli
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.utils import init_seed
from recbole_vlm2rec.item_embeddings import export_item_embeddings
from recbole_vlm2rec.errors import ConfigError, DataError
from recbole_vlm2rec.models.vlm2rec_sasrec import VLM2RecSASRec

TINY_ITEMS = [f"i{i}" for i in range(1, 41)]  # the items of tests/fixtures/tiny-seq
DIMS = {"text": 24, "image": 32}
TINY_YAML = str(FIXTURES / "tiny-seq.yaml")


def write_features(prefix, tokens=TINY_ITEMS, dims=DIMS, seed=0, no_image=()):
    """Random arrays in the export format; items in ``no_image`` get a zero image row (no image)."""
    rng = np.random.default_rng(seed)
    arrays = {m: rng.normal(size=(len(tokens), d)).astype(np.float32) for m, d in dims.items()}
    for token in no_image:
        arrays["image"][tokens.index(token)] = 0.0
    export_item_embeddings(str(prefix), tokens, arrays, {"backbone": "random"})
    return arrays


def build(model_name="VLM2RecSASRec", **overrides):
    """(config, dataset, model) on tiny-seq; ``overrides`` are config keys (``lambda_`` for ``lambda``)."""
    if "lambda_" in overrides:
        overrides["lambda"] = overrides.pop("lambda_")
    config = Config(
        model=model_name,
        dataset="tiny-seq",
        config_file_list=[TINY_YAML],
        config_dict={"data_path": str(FIXTURES), "hidden_dropout_prob": 0.3, "attn_dropout_prob": 0.3, **overrides},
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model_class = SASRec if model_name == "SASRec" else VLM2RecSASRec
    return config, train_data, model_class(config, train_data._dataset)


# ------------------------------------------------------------------------------------------- equivalence


def test_without_features_it_is_sasrec_on_the_same_batch():
    _, train_data, sasrec = build("SASRec")
    _, _, ours = build(feature_modalities=[], alpha=0.0, lambda_=0.0)
    ours.load_state_dict(sasrec.state_dict())  # strict: the same parameters under the same names
    batch = next(iter(train_data))

    sasrec.train(), ours.train()  # dropout on: the same seed must give the same masks
    torch.manual_seed(7)
    expected = sasrec.calculate_loss(batch)
    torch.manual_seed(7)
    rec, wpcl, crtr = ours.calculate_loss(batch)
    assert torch.allclose(rec, expected, rtol=0, atol=1e-7)
    assert float(wpcl) == 0.0 and float(crtr) == 0.0

    expected.backward()
    (rec + wpcl + crtr).backward()
    for (name, p), (_, q) in zip(sasrec.named_parameters(), ours.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7), name

    sasrec.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(sasrec.full_sort_predict(batch), ours.full_sort_predict(batch), rtol=0, atol=1e-6)
        assert torch.allclose(sasrec.predict(batch), ours.predict(batch), rtol=0, atol=1e-6)


def test_no_features_and_no_id_embedding_is_a_config_error():
    with pytest.raises(ConfigError, match="no item representation"):
        build(feature_modalities=[], use_id_embedding=False)


# --------------------------------------------------------------------------------------- with features


def test_loss_terms_gradients_and_missing_images(tmp_path):
    write_features(tmp_path / "f", no_image=["i3", "i7"])
    _, train_data, model = build(feature_prefix=str(tmp_path / "f"), alpha=0.5, lambda_=0.5)
    ids = {token: i for i, token in enumerate(train_data._dataset.field2id_token["item_id"])}
    assert not model.present_image[ids["i3"]] and not model.present_image[ids["i7"]]
    assert int(model.present_image.sum()) == 38 and int(model.present_text.sum()) == 40  # row 0 is padding
    assert "features_text" not in model.state_dict()  # inputs, not parameters: not in checkpoints

    model.train()
    rec, wpcl, crtr = model.calculate_loss(next(iter(train_data)))
    assert all(torch.isfinite(t) and t > 0 for t in (rec, wpcl, crtr))
    (rec + wpcl + crtr).backward()
    for module in (model.adapters["text"], model.adapters["image"], model.item_embedding, model.trm_encoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    summary = model.diagnostics.summary()
    assert summary["steps"] == 1 and summary["weak_image_share"] + summary["weak_text_share"] == 1

    model.eval()
    with torch.no_grad():
        branches = model.branch_tables()
    assert branches["image"][ids["i3"]].abs().sum() == 0 and branches["image"][ids["i4"]].abs().sum() > 0


def test_gradient_norm_ratio_is_computed_on_every_kth_training_step_only(tmp_path):
    write_features(tmp_path / "f")
    _, train_data, model = build(feature_prefix=str(tmp_path / "f"), diagnostics_every=3)
    asked = []
    forward = model.objective.forward
    model.objective.forward = lambda *args, **kwargs: asked.append(kwargs["grad_norm_ratio"]) or forward(*args, **kwargs)
    batch = next(iter(train_data))
    model.train()
    for _ in range(7):
        sum(model.calculate_loss(batch)).backward()
    model.eval()
    with torch.no_grad():  # evaluation-mode losses neither count as steps nor ask for the ratio
        model.calculate_loss(batch)
    assert asked == [True, False, False, True, False, False, True, False]
    summary = model.diagnostics.summary()
    assert summary["steps"] == 7 and np.isfinite(summary["grad_norm_ratio"])
    assert int(model.diagnostics._counts["grad_norm_ratio"]) == 3  # the epoch mean is over the 3 measured steps


def test_compiled_objective_gives_the_eager_losses_gradients_and_detector_state(tmp_path):
    torch.set_num_threads(1)
    write_features(tmp_path / "f")
    models = {}
    for compiled in (False, True):
        _, train_data, model = build(feature_prefix=str(tmp_path / "f"), alpha=0.5, lambda_=0.5,
                                     hidden_dropout_prob=0.0, attn_dropout_prob=0.0, adapter_dropout=0.0,
                                     grad_norm_diagnostics=False,
                                     compile_objective=compiled)
        models[compiled] = model
    models[True].load_state_dict(models[False].state_dict())
    batches = list(train_data)[:2]
    results = {}
    for compiled, model in models.items():
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []
        for batch in batches:  # two steps: the second sees the detector's EMA of the first
            optimizer.zero_grad()
            terms = model.calculate_loss(batch)
            sum(terms).backward()
            steps.append(([float(t) for t in terms], [p.grad.clone() for p in model.parameters()]))
            optimizer.step()
        results[compiled] = steps, {k: v.clone() for k, v in model.objective.detector.state_dict().items()}
    assert models[True].objective._compiled_call_impl is not None  # it did run compiled
    for (eager_terms, eager_grads), (compiled_terms, compiled_grads) in zip(results[False][0], results[True][0]):
        assert compiled_terms == pytest.approx(eager_terms, rel=1e-5, abs=1e-6)
        for a, b in zip(eager_grads, compiled_grads):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, atol=1e-6, rtol=1e-5)


def test_a_text_only_prefix_is_read_as_text_only_and_the_modality_terms_are_off(tmp_path, caplog):
    """feature_modalities: ~ (the default) reads the modalities the prefix has; with one, WPCL and CRTR (which
    compare two branches) are not computed and the log says so."""
    write_features(tmp_path / "t", dims={"text": 24})
    with caplog.at_level("INFO"):
        config, train_data, model = build(feature_prefix=str(tmp_path / "t"), alpha=0.5, lambda_=0.5)
    assert model.modalities == ["text"] and config["feature_modalities"] == ["text"]
    assert not hasattr(model, "objective") and not model.grad_norm_diagnostics
    log = caplog.text
    assert f"feature_modalities: ~ -> ['text'] (the modalities {tmp_path / 't'} has)" in log
    assert "one feature modality (text): WPCL and CRTR need text and image, so they are off" in log
    model.train()
    rec, wpcl, crtr = model.calculate_loss(next(iter(train_data)))
    assert rec > 0 and wpcl == 0 and crtr == 0 and model.diagnostics.summary()["steps"] == 0
    # both modalities when the prefix has both; an explicit list still insists on what it names
    write_features(tmp_path / "b")
    assert build(feature_prefix=str(tmp_path / "b"))[2].modalities == ["text", "image"]
    with pytest.raises(DataError, match=r"image features not found.*this prefix has: text"):
        build(feature_prefix=str(tmp_path / "t"), feature_modalities=["text", "image"])


def test_score_temperature_scores_by_cosine_over_the_temperature_in_training_and_evaluation(tmp_path):
    write_features(tmp_path / "f")
    _, train_data, plain = build(feature_prefix=str(tmp_path / "f"))
    _, _, scaled = build(feature_prefix=str(tmp_path / "f"), score_temperature=0.05)
    scaled.load_state_dict(plain.state_dict())
    batch = next(iter(train_data))
    plain.eval(), scaled.eval()
    with torch.no_grad():
        items = plain.item_representations()
        user = plain._user_vectors(batch, items)
        dot = plain.full_sort_predict(batch)
        assert torch.allclose(dot, user @ items.t(), atol=1e-6)  # ~: SASRec's dot product
        cosine = torch.nn.functional.cosine_similarity(user.unsqueeze(1), items.unsqueeze(0), dim=-1)
        assert torch.allclose(scaled.full_sort_predict(batch), cosine / 0.05, atol=1e-4)
        picked = scaled.full_sort_predict(batch).gather(1, batch["item_id"].unsqueeze(1)).squeeze(1)
        assert torch.allclose(scaled.predict(batch), picked, atol=1e-4)
    rec, _, _ = scaled.calculate_loss(batch)  # eval mode: no dropout, the same vectors
    assert torch.allclose(rec, torch.nn.functional.cross_entropy(cosine / 0.05, batch["item_id"]), atol=1e-5)


def test_finetune_initialises_trainable_tables_from_the_features(tmp_path):
    # 12-d features under hidden_size 16: the principal components keep everything, so the table's rows are
    # the (normalised, centred) features in another basis, with the same item-item cosines
    arrays = write_features(tmp_path / "f", dims={"text": 12, "image": 12})
    _, train_data, model = build(feature_prefix=str(tmp_path / "f"), item_init="finetune")
    assert not hasattr(model, "adapters") and not hasattr(model, "features_text")
    table = model.item_tables["text"].weight
    assert table.requires_grad and table.shape == (41, 16) and table[0].abs().sum() == 0
    order = [TINY_ITEMS.index(t) for t in train_data._dataset.field2id_token["item_id"][1:]]
    features = torch.nn.functional.normalize(torch.from_numpy(arrays["text"][order]))
    centred = torch.nn.functional.normalize(features - features.mean(0))
    rows = torch.nn.functional.normalize(table[1:].detach())
    assert torch.allclose(rows @ rows.T, centred @ centred.T, atol=1e-4)


def test_newest_vlm2rec_export_of_the_dataset_is_found_under_checkpoint_dir(tmp_path):
    write_features(tmp_path / "saved" / "VLM2Rec-old" / "item_embeddings", seed=1)
    other = ["x1", "x2"]  # an export of another dataset, written later: not this dataset's
    write_features(tmp_path / "saved" / "VLM2Rec-newer" / "item_embeddings", seed=2)
    write_features(tmp_path / "saved" / "VLM2Rec-other" / "item_embeddings", tokens=other, seed=3)
    config, _, _ = build(checkpoint_dir=str(tmp_path / "saved"))
    assert config["feature_prefix"] == str(tmp_path / "saved" / "VLM2Rec-newer" / "item_embeddings")


def test_no_export_and_no_feature_prefix_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"no VLM2Rec export of dataset 'tiny-seq'.*run_recbole --model=VLM2Rec"):
        build(checkpoint_dir=str(tmp_path / "nothing-here"))


# ----------------------------------------------------------------------------------------- bad arrays


def _rewrite(prefix, modality, array=None, **sidecar):
    if array is not None:
        np.save(f"{prefix}.{modality}.npy", array)
    path = f"{prefix}.{modality}.json"
    meta = json.loads(open(path).read())
    meta.update(sidecar)
    with open(path, "w") as handle:
        json.dump(meta, handle)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p, a: _rewrite(p, "image", a["image"][:, :30]), r"image\.npy: dimension 30 but its sidecar says 32"),
        (lambda p, a: _rewrite(p, "text", a["text"][:, :, None]), r"text\.npy: expected a 2-D"),
        (lambda p, a: _rewrite(p, "text", a["text"][:-1], dim=24), r"text\.npy: 39 rows but its sidecar lists 40"),
        (lambda p, a: _rewrite(p, "image", np.where(np.arange(40)[:, None] == 5, np.nan, a["image"])), "NaN"),
        (lambda p, a: __import__("os").remove(f"{p}.image.npy"), r"no file .*f\.image\.npy \(this prefix has: text\)"),
        (lambda p, a: __import__("os").remove(f"{p}.text.json"), r"no sidecar .*f\.text\.json with item_tokens"),
        (
            lambda p, a: _rewrite(p, "text", a["text"][:-2], item_tokens=TINY_ITEMS[:-2], num_items=38),
            r"2 of the dataset's 40 items have no row \(e\.g\. \['i39', 'i40'\]\).*missing_item_policy: zero",
        ),
    ],
    ids=["dimension", "3-d", "row-count", "nan", "missing-file", "no-sidecar", "absent-items"],
)
def test_bad_arrays_give_clear_errors(tmp_path, damage, message):
    arrays = write_features(tmp_path / "f")
    damage(str(tmp_path / "f"), arrays)
    with pytest.raises(DataError, match=message):  # both named: a missing one is an error, not a text-only prefix
        build(feature_prefix=str(tmp_path / "f"), feature_modalities=["text", "image"])


def test_absent_items_get_zero_rows_by_option_and_are_counted(tmp_path, caplog):
    arrays = write_features(tmp_path / "f")
    _rewrite(str(tmp_path / "f"), "text", arrays["text"][:-2], item_tokens=TINY_ITEMS[:-2], num_items=38)
    with caplog.at_level("WARNING"):
        _, _, model = build(feature_prefix=str(tmp_path / "f"), missing_item_policy="zero")
    assert "text features: 2 of 40 items are not in" in caplog.text
    assert int(model.present_text.sum()) == 38 and int(model.present_image.sum()) == 40


def test_checkpoint_on_features_of_another_dimension_is_refused(tmp_path):
    write_features(tmp_path / "a")
    write_features(tmp_path / "b", dims={"text": 20, "image": 32})
    _, _, trained = build(feature_prefix=str(tmp_path / "a"))
    _, _, reloaded = build(feature_prefix=str(tmp_path / "b"))
    with pytest.raises(DataError, match="trained on text features of dimension 24.*have dimension 20"):
        reloaded.load_state_dict(trained.state_dict())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"item_init": "thaw"}, "item_init must be one of"),
        ({"missing_item_policy": "skip"}, "missing_item_policy must be one of"),
        ({"feature_modalities": ["text", "audio"]}, "feature_modalities must list distinct names"),
        ({"alpha": -1.0}, "alpha must be a number >= 0"),
        ({"crtr_relation": "user"}, "crtr_relation: 'user' is not available"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"wpcl_form": "squared"}, "form must be one of 'relative', 'absolute'"),
        ({"adapter_dropout": 1.0}, r"adapter_dropout must be in \[0, 1\)"),
        ({"score_temperature": 0.0}, r"score_temperature must be a number > 0 or ~ \(none\), got 0.0"),
    ],
)
def test_bad_settings_give_clear_errors(tmp_path, overrides, message):
    write_features(tmp_path / "f")
    with pytest.raises(ConfigError, match=message):
        build(feature_prefix=str(tmp_path / "f"), **overrides)


# ------------------------------------------------------------------------------------- the demo, end to end


def _test_ndcg10(log: str) -> float:
    match = re.search(r"test result: .*?'ndcg@10', (?:np\.float64\()?([0-9.]+)", log)
    assert match, log[-3000:]
    return float(match.group(1))


def _informative_demo_features(dataset_dir, prefix, noise=0.5, dim=32, seed=0):
    """Per-modality features that encode the demo's planted attributes (text: scent theme, image: pattern)
    plus noise: what a good multimodal embedder would export."""
    latent = json.loads((dataset_dir / "vlm2rec-demo.latent.json").read_text())
    tokens = sorted(latent["items"])
    rng = np.random.default_rng(seed)
    arrays = {}
    for modality in ("text", "image"):
        values = len(latent[f"{modality}_attribute"]["values"])
        prototypes = rng.normal(size=(values, dim)) / np.sqrt(dim)
        attribute = np.array([latent["items"][t][modality] for t in tokens])
        arrays[modality] = prototypes[attribute] + noise * rng.normal(size=(len(tokens), dim)) / np.sqrt(dim)
    export_item_embeddings(str(prefix), tokens, arrays, {"backbone": "planted attributes + noise"})


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """A data path holding vlm2rec-demo, built once for this module."""
    from dataset_tools.demo import ensure_demo_dataset

    data_path = tmp_path_factory.mktemp("data")
    ensure_demo_dataset(data_path)
    return data_path


def _small_settings(path):
    # Both models: the same small encoder, split, seed and budget; SASRec's other defaults.
    path.write_text(
        "hidden_size: 32\ninner_size: 64\nn_layers: 1\nn_heads: 1\ntrain_batch_size: 256\nMAX_ITEM_LIST_LENGTH: 20\n"
        "gpu_id: ''\nshow_progress: False\n"
    )
    return path


def test_demo_informative_features_beat_sasrec_through_run_recbole(tmp_path, demo_data):
    _informative_demo_features(demo_data / "vlm2rec-demo", tmp_path / "features" / "demo")
    settings = _small_settings(tmp_path / "demo.yaml")
    common = ["--dataset=vlm2rec-demo", f"--data_path={demo_data}", f"--config_files={settings}", "--epochs=3"]
    sasrec = run_cli(["--model=SASRec", *common], cwd=tmp_path)
    assert sasrec.returncode == 0, sasrec.stderr[-3000:]
    features = f"--feature_prefix={tmp_path / 'features' / 'demo'}"
    ours = run_cli(["--model=VLM2RecSASRec", *common, features], cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr[-3000:]
    log = ours.stdout + ours.stderr
    assert "text features:" in log and "image features:" in log and "epoch 2 modality: L^T" in log
    ndcg_sasrec, ndcg_ours = _test_ndcg10(sasrec.stdout + sasrec.stderr), _test_ndcg10(log)
    print(f"demo test NDCG@10: SASRec {ndcg_sasrec:.4f}, VLM2RecSASRec {ndcg_ours:.4f}", file=sys.stderr)
    assert ndcg_ours > ndcg_sasrec


def test_vlm2rec_export_then_vlm2recsasrec_through_run_recbole(tmp_path, demo_data):
    # Step 1: VLM2Rec exports the catalog's embeddings under saved/ (0 epochs: the tiny VLM as built, which
    # is enough to test the pipeline; the demo's own settings come from its quick-start preset).
    vlm = run_cli(["--model=VLM2Rec", "--dataset=vlm2rec-demo", f"--data_path={demo_data}", "--epochs=0"], cwd=tmp_path)
    assert vlm.returncode == 0, vlm.stderr[-3000:]
    assert list((tmp_path / "saved").glob("VLM2Rec-*/item_embeddings.image.npy"))
    # Step 2: VLM2RecSASRec finds that export by itself (no feature_prefix) and trains on it.
    settings = _small_settings(tmp_path / "sr.yaml")
    ours = run_cli(
        ["--model=VLM2RecSASRec", "--dataset=vlm2rec-demo", f"--data_path={demo_data}", f"--config_files={settings}",
         "--epochs=1"],
        cwd=tmp_path,
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    log = ours.stdout + ours.stderr
    assert re.search(r"text features: \S*/saved/VLM2Rec-[^/]+/item_embeddings\.text\.npy", log), log[-3000:]
    assert "epoch 0 modality: L^T" in log and "test result" in log
