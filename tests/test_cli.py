"""The ``run_recbole`` command, end to end in a subprocess, on the tiny committed fixture."""
import pytest

from helpers import FIXTURES, run_cli

TINY = ["--dataset=tiny-seq", f"--data_path={FIXTURES}", f"--config_files={FIXTURES / 'tiny-seq.yaml'}"]


def test_builtin_sasrec_one_epoch_prints_test_results(tmp_path):
    result = run_cli(["--model=SASRec", *TINY, "--epochs=1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "best valid" in log and "test result" in log and "ndcg@10" in log
    assert list((tmp_path / "saved").glob("SASRec-*.pth")), "the best model was saved and reloaded for the test"


def test_builtin_models_run_by_name(tmp_path):
    for model in ("GRU4Rec", "BPR"):
        result = run_cli([f"--model={model}", *TINY, "--epochs=1"], cwd=tmp_path)
        assert result.returncode == 0, (model, result.stderr[-3000:])
        assert "test result" in result.stdout + result.stderr


def test_command_line_overrides_plugin_yaml_default(tmp_path):
    prelude = "import sys; sys.path.insert(0, %r); import plugin_toy.toy_plugin_rec" % str(FIXTURES.parent)
    result = run_cli(["--model=ToyPluginRec", *TINY, "--epochs=1"], cwd=tmp_path, prelude=prelude)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "epoch 0 training" in log and "epoch 1 training" not in log  # YAML says 2, the command line 1
    assert "toy_marker = from-yaml" in log  # the plugin's default properties were loaded


def test_unknown_model_lists_available_models(tmp_path):
    result = run_cli(["--model=NoSuchModel", *TINY], cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown model 'NoSuchModel'" in result.stderr
    assert "SASRec" in result.stderr and "lightgbm" not in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_dataset_names_the_path_looked_at(tmp_path):
    result = run_cli(["--model=SASRec", "--dataset=no-such-data", f"--data_path={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown dataset 'no-such-data'" in result.stderr
    assert str(tmp_path / "no-such-data" / "no-such-data.inter") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content, expected",
    [("epochs: [1, 2\n", "cannot read config file"), ("- just\n- a list\n", "must hold a YAML mapping")],
)
def test_unreadable_yaml_names_the_file(tmp_path, content, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    result = run_cli(["--model=SASRec", "--dataset=tiny-seq", f"--config_files={bad}"], cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_named(tmp_path):
    result = run_cli(["--model=SASRec", *TINY[:2], f"--config_files={tmp_path / 'nope.yaml'}"], cwd=tmp_path)
    assert result.returncode == 2 and "config file not found" in result.stderr and "nope.yaml" in result.stderr


def test_unknown_key_is_warned_with_a_suggestion(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("hiden_size: 16\n")
    result = run_cli(["--model=SASRec", *TINY[:2], f"--config_files={FIXTURES / 'tiny-seq.yaml'} {typo}",
                      "--epochs=1", "--learing_rate=0.01"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unknown key 'hiden_size'" in result.stderr and "did you mean 'hidden_size'" in result.stderr
    assert "unknown key 'learing_rate'" in result.stderr and "did you mean 'learning_rate'" in result.stderr
