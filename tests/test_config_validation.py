"""Typed validation of configuration values (recbole_vlm2rec/settings.py) and the near-miss key warning.

A bad value fails when RecBole's Config is built, before any data is read, so these tests are fast: most call
Config (the Python API path) in-process; a few run the real command to check the exit code and that no
traceback is shown.
"""
import sys

import pytest

import recbole_vlm2rec  # noqa: F401
from helpers import FIXTURES, run_cli, write_tiny_multimodal_dataset
from recbole.config import Config

from recbole_vlm2rec import cli
from recbole_vlm2rec.errors import ConfigError
from recbole_vlm2rec.settings import LOSS_KEYS, config_errors

TINY_SEQ = str(FIXTURES / "tiny-seq.yaml")
VLM2REC_TINY = str(FIXTURES / "vlm2rec-tiny.yaml")
TINY = ["--dataset=tiny-seq", f"--data_path={FIXTURES}", f"--config_files={TINY_SEQ}"]


def _config(model, **overrides):
    """A Config of ``model`` on a tiny fixture (datasets are not read: Config only needs their names)."""
    if model == "VLM2Rec":
        return Config(model=model, dataset="tiny-mm", config_file_list=[VLM2REC_TINY], config_dict=overrides)
    return Config(model=model, dataset="tiny-seq", config_file_list=[TINY_SEQ],
                  config_dict=dict(data_path=str(FIXTURES), **overrides))


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory):
    return write_tiny_multimodal_dataset(tmp_path_factory.mktemp("data")).parent


# ----------------------------------------------------------------------------------- the real command


@pytest.mark.parametrize(
    "model, arg, key, value",
    [
        ("SASRec", "--epochs=abc", "epochs", "'abc'"),
        ("SASRec", "--learning_rate=-1", "learning_rate", "-1"),
        ("SASRec", "--train_batch_size=0", "train_batch_size", "0"),
        ("VLM2Rec", "--wpcl_form=squared", "wpcl_form", "'squared'"),
        ("VLM2Rec", "--finetune=lore", "finetune", "'lore'"),
        ("VLM2Rec", "--beta=-1", "beta", "-1"),
        ("VLM2Rec", "--image_size=0", "image_size", "0"),
    ],
)
def test_bad_value_is_one_error_line_and_exit_1(tmp_path, tiny_mm, model, arg, key, value):
    common = TINY
    if model == "VLM2Rec":
        common = ["--dataset=tiny-mm", f"--data_path={tiny_mm}", f"--config_files={VLM2REC_TINY}"]
    result = run_cli([f"--model={model}", *common, arg], cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("run_recbole: error:")]
    assert error and key in error[0] and f"got {value}" in error[0], result.stderr[-3000:]
    assert "epoch 0 training" not in result.stdout + result.stderr  # stopped before anything ran


# ------------------------------------------------------------------------------- good values still pass


@pytest.mark.parametrize(
    "model, dataset, files",
    [
        ("VLM2Rec", "tiny-mm", [VLM2REC_TINY]),
        ("VLM2RecSASRec", "tiny-seq", [TINY_SEQ]),
        ("SASRec", "tiny-seq", [TINY_SEQ]),
        ("BPR", "tiny-seq", [TINY_SEQ]),
        # the shipped defaults and presets (properties/), as the demo and the Amazon template use them
        ("VLM2Rec", "vlm2rec-demo", None),
        ("VLM2RecSASRec", "vlm2rec-demo", None),
        ("VLM2Rec", "amazon-uni100", None),
        ("SASRec", "ml-100k", None),
    ],
)
def test_valid_configurations_pass(model, dataset, files):
    config = Config(model=model, dataset=dataset, config_file_list=files)  # validated while it is built
    # and the values as RecBole leaves them (eval_args completed, topk a list) pass again
    assert config_errors(config.final_config_dict, model) == []


def test_command_line_values_are_checked_as_recbole_parses_them(monkeypatch):
    # RecBole evaluates a command-line value that is a Python literal and keeps any other text as a string
    monkeypatch.setattr(sys, "argv", ["run_recbole", "--learning_rate=1e-3", "--epochs=3", "--topk=[5,10]",
                                      "--gradient_checkpointing=false", "--modalities=text", "--valid_metric=ndcg@5"])
    config = _config("VLM2Rec")
    assert config["learning_rate"] == 0.001 and config["epochs"] == 3 and config["gradient_checkpointing"] is False
    monkeypatch.setattr(sys, "argv", ["run_recbole", "--epochs=3.0", "--gradient_checkpointing=maybe"])
    with pytest.raises(ConfigError) as caught:
        _config("VLM2Rec")
    assert "epochs must be an integer >= 0, got 3.0" in str(caught.value)
    assert "'gradient_checkpointing' must be bool, got 'maybe'" in str(caught.value)


def test_list_values_typed_on_the_command_line_become_lists(monkeypatch):
    """``--modalities=[text]`` is the string '[text]' to RecBole; our list keys accept it as users type it."""
    monkeypatch.setattr(sys, "argv", ["run_recbole", "--modalities=[text]", "--item_text_fields=[title, brand]",
                                      "--lora_target_modules=q_proj,v_proj"])
    config = _config("VLM2Rec")
    assert config["modalities"] == ["text"] and config["item_text_fields"] == ["title", "brand"]
    assert config["lora_target_modules"] == ["q_proj", "v_proj"]
    monkeypatch.setattr(sys, "argv", ["run_recbole", "--feature_modalities=[text]"])
    assert _config("VLM2RecSASRec")["feature_modalities"] == ["text"]
    monkeypatch.setattr(sys, "argv", ["run_recbole", "--feature_modalities=[]"])
    assert _config("VLM2RecSASRec")["feature_modalities"] == []
    monkeypatch.setattr(sys, "argv", ["run_recbole", "--modalities=[text, audio]"])
    with pytest.raises(ConfigError, match="modalities must be a list of names from"):
        _config("VLM2Rec")


def test_loss_keys_are_the_keys_the_objective_reads():
    from recbole_vlm2rec.losses import VLM2RecObjective

    read = []

    class Recording(dict):
        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

    values = dict(tau=0.05, beta=1.0, wpcl_form="relative", tau_r=0.1, weak_criterion="loss", crtr_relation="item",
                  weak_ema_momentum=0.9)
    VLM2RecObjective.from_settings(Recording(values), crtr_weight=0.1)
    assert set(read) | {"lambda"} == set(LOSS_KEYS)


# -------------------------------------------------------------------------------------- bad values, unit


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        # RecBole keys, any model
        ("SASRec", {"epochs": 2.5}, "epochs must be an integer >= 0, got 2.5"),
        ("SASRec", {"epochs": True}, "epochs must be an integer >= 0, got True"),
        ("SASRec", {"learning_rate": "fast"}, "learning_rate must be a number > 0, got 'fast'"),
        ("SASRec", {"eval_batch_size": -5}, "eval_batch_size must be an integer >= 1, got -5"),
        ("SASRec", {"stopping_step": "ten"}, "stopping_step must be an integer >= 0, got 'ten'"),
        ("SASRec", {"topk": [10, 0]}, r"topk must be a positive integer or a non-empty list of them, got \[10, 0\]"),
        ("SASRec", {"MAX_ITEM_LIST_LENGTH": 0}, "MAX_ITEM_LIST_LENGTH must be an integer >= 1, got 0"),
        ("SASRec", {"learner": "adamm"}, "learner must be one of 'adam', 'adamw'.*got 'adamm'"),
        ("BPR", {"weight_decay": -0.1}, "weight_decay must be a number >= 0, got -0.1"),
        ("BPR", {"eval_args": "RS"}, "eval_args must be a mapping"),
        ("BPR", {"eval_args": {"spilt": {"RS": [0.8, 0.1, 0.1]}}}, r"eval_args has unknown keys \['spilt'\]"),
        ("BPR", {"eval_args": {"split": {"RS": [0.8, 0.2]}}}, r"split.RS must be three ratios.*got \[0.8, 0.2\]"),
        ("BPR", {"eval_args": {"split": {"XS": 1}}}, r"eval_args.split must be one of .*got \{'XS': 1\}"),
        ("BPR", {"eval_args": {"group_by": "item"}}, "eval_args.group_by must be one of 'user', 'none', got 'item'"),
        ("BPR", {"eval_args": {"order": "SO"}}, "eval_args.order must be one of 'RO', 'TO', got 'SO'"),
        ("BPR", {"eval_args": {"mode": "uni"}}, "eval_args.mode must be one of 'full', 'labeled', 'uniN'.*got 'uni'"),
        ("BPR", {"eval_args": {"mode": {"valid": "full", "test": "pop0"}}}, "eval_args.mode.test must be .*got 'pop0'"),
        ("SASRec", {"eval_args": {"split": {"LS": "valid_and_tset"}, "order": "TO"}},
         "eval_args.split.LS must be one of 'valid_and_test', 'valid_only', 'test_only', got 'valid_and_tset'"),
        # an eval_args without order replaces the sequential preset's TO with RecBole's default RO
        ("SASRec", {"eval_args": {"split": {"LS": "valid_and_test"}, "mode": "full"}},
         "eval_args.order must be 'TO' for a sequential model, got 'RO' \\(RecBole's default"),
        ("SASRec", {"metrics": ["NDCG", "Recal"]}, r"metrics must be names from .*got unknown \['Recal'\]"),
        ("SASRec", {"metrics": ["NDCG", "AUC"]}, "metrics must be all ranking metrics or all value metrics"),
        ("SASRec", {"valid_metric": "NDCG@20"}, "valid_metric must be one of the metrics .*ndcg@10.*got 'NDCG@20'"),
        ("SASRec", {"torch_num_threads": "two"}, r"torch_num_threads must be an integer >= 0 or ~ \(none\), got 'two'"),
        # VLM2Rec: its table, EncoderConfig's rules and VLM2RecObjective's rules
        ("VLM2Rec", {"max_history_items": 0}, "max_history_items must be an integer >= 1, got 0"),
        ("VLM2Rec", {"fusion": "early"}, "fusion must be one of 'external', 'internal', got 'early'"),
        ("VLM2Rec", {"modalities": ["text", "audio"]}, r"modalities must be a list of names from \['text', 'image'\]"),
        ("VLM2Rec", {"item_text_fields": "title"}, "item_text_fields must be a list of names .*got 'title'"),
        ("VLM2Rec", {"amp_dtype": "fp32"}, "amp_dtype must be one of 'bf16', 'fp16', got 'fp32'"),
        ("VLM2Rec", {"export_embeddings": "yes"}, "export_embeddings must be true or false, got 'yes'"),
        ("VLM2Rec", {"contrastive_chunk_size": 0}, r"contrastive_chunk_size must be an integer >= 1 or ~ \(none\), got 0"),
        ("VLM2Rec", {"lora_dropout": 1.5}, "'lora_dropout' must be in \\[0, 1\\), got 1.5"),
        ("VLM2Rec", {"vlm_dtype": "int8"}, "'vlm_dtype' must be one of auto, bf16, fp16, fp32; got 'int8'"),
        ("VLM2Rec", {"image_size": "big"}, "'image_size' must be int, got 'big'"),
        ("VLM2Rec", {"train_vision_tower": True, "finetune": "frozen"},
         "'train_vision_tower' is true but 'finetune' is 'frozen'"),
        ("VLM2Rec", {"tau": 0}, "tau must be > 0, got 0"),
        ("VLM2Rec", {"tau_r": "warm"}, "tau_r must be a real number, got 'warm'"),
        ("VLM2Rec", {"weak_criterion": "norm"}, "weak_criterion: criterion must be one of 'loss', 'grad', 'accuracy'; got 'norm'"),
        ("VLM2Rec", {"weak_ema_momentum": 1.0}, r"weak_ema_momentum: momentum must be in \[0, 1\), got 1.0"),
        ("VLM2Rec", {"crtr_relation": "items"}, "crtr_relation: relation must be one of 'item', 'user', 'both'; got"),
        ("VLM2Rec", {"lambda": -0.5}, "lambda: crtr_weight must be >= 0, got -0.5"),
        ("VLM2Rec", {"train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
         "train_neg_sample_args must be ~ \\(none\\), or a mapping with distribution: none, got"),
        # VLM2RecSASRec
        ("VLM2RecSASRec", {"item_init": "thaw"}, "item_init must be one of 'frozen', 'finetune', got 'thaw'"),
        ("VLM2RecSASRec", {"missing_item_policy": "skip"}, "missing_item_policy must be one of 'error', 'zero', got"),
        ("VLM2RecSASRec", {"feature_modalities": ["text", "text"]}, "feature_modalities must list distinct names"),
        ("VLM2RecSASRec", {"adapter_dropout": 1.0}, r"adapter_dropout must be in \[0, 1\), got 1.0"),
        ("VLM2RecSASRec", {"alpha": "x"}, "alpha must be a number >= 0, got 'x'"),
        ("VLM2RecSASRec", {"hidden_act": "gelu2"}, "hidden_act must be one of 'gelu', 'relu'.*got 'gelu2'"),
        ("VLM2RecSASRec", {"hidden_dropout_prob": 1.5}, r"hidden_dropout_prob must be in \[0, 1\], got 1.5"),
        ("VLM2RecSASRec", {"n_heads": 3, "hidden_size": 64}, r"hidden_size must be a multiple of n_heads \(3\), got"),
        ("VLM2RecSASRec", {"loss_type": "BPR"}, "loss_type must be one of 'CE', got 'BPR'"),
        ("VLM2RecSASRec", {"beta": -1.0}, "beta must be >= 0, got -1.0"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(model, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(model, **overrides)


def test_every_bad_value_is_listed_at_once():
    with pytest.raises(ConfigError) as caught:
        _config("SASRec", epochs="abc", learning_rate=-1)
    text = str(caught.value)
    assert text.startswith("2 bad settings:") and "epochs must be" in text and "learning_rate must be" in text


def test_our_model_keys_are_checked_for_our_models_only():
    # SASRec has no `fusion` or `tau` of ours: a value there is the business of whichever model reads it
    values = dict(_config("SASRec").final_config_dict, fusion="early", tau="anything")
    assert config_errors(values, "SASRec") == []
    assert len(config_errors(values, "VLM2Rec")) == 2


def test_python_api_fails_before_reading_data(tmp_path):
    from recbole.quick_start import run_recbole

    # no dataset exists under data_path: reaching the data would be another error
    with pytest.raises(ConfigError, match="beta must be >= 0, got -1"):
        run_recbole(model="VLM2Rec", dataset="tiny-mm", config_file_list=[VLM2REC_TINY],
                    config_dict={"data_path": str(tmp_path), "beta": -1})
    with pytest.raises(ConfigError, match="epochs must be an integer >= 0, got 'abc'"):
        cli.run("SASRec", "tiny-seq", [TINY_SEQ, _write(tmp_path / "bad.yaml", "epochs: abc\n")])


def _write(path, text):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------- near-miss key warning


def test_near_miss_of_the_selected_models_key_is_warned(capsys):
    # `lamda` is a setting of other RecBole models, so it used to count as known for VLM2Rec too
    cli.warn_unknown_keys([], ["--lamda=0.5", "--lambda=0.5", "--hidden_size=64", "--epochs=1"], "VLM2Rec")
    err = capsys.readouterr().err
    assert "'lamda'" in err and "not a setting of VLM2Rec" in err and "did you mean 'lambda'?" in err
    assert "hidden_size" not in err and "'lambda' in" not in err and "epochs" not in err
    cli.warn_unknown_keys([], ["--lamda=0.5"], "SASRec")  # not a near miss of SASRec's keys: as before
    assert capsys.readouterr().err == ""


def test_unknown_keys_prefer_the_selected_models_keys(tmp_path, capsys):
    typo = _write(tmp_path / "typo.yaml", "wpcl_fomr: absolute\n")
    cli.warn_unknown_keys([typo], ["--learing_rate=0.01"], "VLM2Rec")
    err = capsys.readouterr().err
    assert f"unknown key 'wpcl_fomr' in {typo} (did you mean 'wpcl_form'?)" in err
    assert "unknown key 'learing_rate' in the command line (did you mean 'learning_rate'?)" in err


def test_the_command_warns_about_the_near_miss(tiny_mm, capsys):
    # a bad epochs value stops the command at configuration time: the warning comes first
    code = cli.main(["--model=VLM2Rec", "--dataset=tiny-mm", f"--data_path={tiny_mm}",
                     f"--config_files={VLM2REC_TINY}", "--lamda=0.5", "--epochs=-1"])
    err = capsys.readouterr().err
    assert code == 1 and "did you mean 'lambda'?" in err and "epochs must be an integer >= 0, got -1" in err


@pytest.mark.parametrize("arg, message", [
    # a hub id that is not in the local cache, offline: how to get the weights, not a traceback
    ("--vlm_name_or_path=Qwen/Qwen2-VL-2B-Instruct", "Cannot load the VLM backbone"),
    # fits the config rules but not this backbone's patch grid (28 px for tiny-qwen2-vl)
    ("--image_size=30", "image_size=30 is not a multiple of 28"),
])
def test_settings_found_wrong_when_the_model_is_built_exit_1(tmp_path, tiny_mm, arg, message):
    result = run_cli(["--model=VLM2Rec", "--dataset=tiny-mm", f"--data_path={tiny_mm}",
                      f"--config_files={VLM2REC_TINY}", arg], cwd=tmp_path, timeout=180,
                     env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr[-3000:]
