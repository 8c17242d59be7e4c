"""The ``vlm2rec-compare`` command on the tiny committed fixtures (SASRec / GRU4Rec, one epoch; VLM2Rec ->
VLM2RecSASRec on the tiny multimodal dataset), and the declarations it goes by.

The first comparison runs the real command in a subprocess; the others call ``compare.main`` in the test
process (the runs themselves are always subprocesses, as in real use).
"""
import ast
import csv
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FIXTURES, REPO_ROOT, write_tiny_multimodal_dataset

from recbole_vlm2rec import compare
from recbole_vlm2rec.compare.plan import Plan, Variant, producers_first
from recbole_vlm2rec.registry import available_models, model_inputs, model_outputs

TINY = [f"--data_path={FIXTURES}", f"--config_files={FIXTURES / 'tiny-seq.yaml'}", "--epochs=1"]


def _run_command(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "recbole_vlm2rec.compare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_two_models_two_seeds_then_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--dataset=tiny-seq", "--models=SASRec,GRU4Rec", "--seeds=1,2", f"--out={out}", *TINY]
    result = _run_command(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("results.csv", "results.md", "runs.csv", "results.png"):
        assert (out / name).is_file(), name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in ("SASRec", "GRU4Rec"):
        for seed in (1, 2):
            run = out / "runs" / f"{model}-seed{seed}"
            assert (run / "run.log").stat().st_size > 0 and list((run / "saved").glob(f"{model}-*.pth"))
    assert "[4/4] GRU4Rec seed 2: done" in result.stdout

    rows = {row["model"]: row for row in _csv(out / "results.csv")}
    assert list(rows) == ["SASRec", "GRU4Rec"]
    for model, row in rows.items():
        assert row["status"] == "ok" and row["runs_ok"] == "2" and row["seeds"] == "1 2"
        assert int(row["params"]) > 0
        tests = [json.loads((out / "runs" / f"{model}-seed{s}" / "result.json").read_text())["test_result"]
                 for s in (1, 2)]
        for metric in ("hit@10", "ndcg@10", "hit@20", "ndcg@20"):
            values = [t[metric] for t in tests]
            assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-4)
            assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-4, abs=1e-9)
        assert float(row["train_time_s_mean"]) > 0 and float(row["eval_time_s_mean"]) > 0
    assert len(_csv(out / "runs.csv")) == 4
    markdown = (out / "results.md").read_text()
    assert "| SASRec | 2/2 |" in markdown and "| GRU4Rec | 2/2 |" in markdown and " ± " in markdown
    assert "NDCG@20" in markdown and "params" in markdown
    assert "| SASRec | 2/2 |" in result.stdout  # the table is printed at the end

    # resume: finished runs are skipped, a run whose result.json was deleted runs again
    kept = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json") if "SASRec-seed2" not in str(p)}
    (out / "runs" / "SASRec-seed2" / "result.json").unlink()
    capsys.readouterr()
    assert compare.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped, finished before") == 3
    assert "SASRec seed 2: running" in printed and "SASRec seed 2: done" in printed
    assert "GRU4Rec seed 1: running" not in printed
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (out / "runs" / "SASRec-seed2" / "result.json").is_file()
    assert len(_csv(out / "results.csv")) == 2


def test_failing_model_is_reported_and_the_others_kept(tmp_path, capsys):
    bad = tmp_path / "bad-gru.yaml"
    bad.write_text("loss_type: NOPE\n")
    out = tmp_path / "cmp"
    code = compare.main(["--dataset=tiny-seq", "--models=SASRec,GRU4Rec", "--seeds=1", f"--out={out}",
                         f"--model_config=GRU4Rec={bad}", *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err  # one model finished: exit 0
    assert "GRU4Rec seed 1: FAILED" in captured.out and "GRU4Rec seed 1 failed" in captured.err
    rows = {row["model"]: row for row in _csv(out / "results.csv")}
    assert rows["SASRec"]["status"] == "ok" and float(rows["SASRec"]["ndcg@10_mean"]) >= 0
    assert rows["GRU4Rec"]["status"] == "failed" and rows["GRU4Rec"]["runs_ok"] == "0"
    markdown = (out / "results.md").read_text()
    log = out / "runs" / "GRU4Rec-seed1" / "run.log"
    assert "## Failed runs" in markdown and "GRU4Rec seed 1" in markdown and str(log) in markdown
    assert "ValueError" in markdown  # the exception line from the run's log (RecBole rejects loss_type NOPE)
    assert (out / "runs" / "GRU4Rec-seed1" / "failed.json").is_file()
    assert not (out / "runs" / "GRU4Rec-seed1" / "result.json").exists()
    assert (out / "results.png").is_file()


def test_downstream_model_waits_for_vlm2rec_and_all_failed_exits_1(tmp_path, capsys):
    # tiny-seq has no item text or images: VLM2Rec fails, so VLM2RecSASRec (listed first) is not even started
    out = tmp_path / "cmp"
    code = compare.main(["--dataset=tiny-seq", "--models=VLM2RecSASRec,VLM2Rec", f"--out={out}", *TINY])
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    assert captured.out.index("[1/2] VLM2Rec seed") < captured.out.index("[2/2] VLM2RecSASRec seed")
    assert "VLM2RecSASRec seed 2020: not run: needs the item embeddings of VLM2Rec seed 2020" in captured.out
    assert "every run failed" in captured.err
    assert not (out / "runs" / "VLM2RecSASRec-seed2020").exists()
    assert {row["status"] for row in _csv(out / "results.csv")} == {"failed"}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dataset=tiny-seq", "--models=SASRec,NoSuchModel"], "unknown model 'NoSuchModel'"),
        (["--dataset=tiny-seq", "--models=SASRec", "--seeds=1,x"], "bad --seeds='1,x'"),
        (["--dataset=tiny-seq", "--models=SASRec", "--seeds=1,1"], "seed 1 is listed twice"),
        (["--dataset=no-such-data", "--models=SASRec", "--data_path=."], "unknown dataset 'no-such-data'"),
        (["--dataset=tiny-seq", "--models=SASRec", "--seed=3"], "use --seeds"),
        (["--dataset=tiny-seq", "--models=SASRec", "--model_config=GRU4Rec=x.yaml"], "is not a row of the comparison"),
        (["--dataset=tiny-seq", "--models=SASRec", "--config_files=nope.yaml"], "config file not found"),
    ],
)
def test_bad_command_lines_exit_2(tmp_path, capsys, args, expected):
    extra = [] if any(a.startswith("--data_path") for a in args) else [f"--data_path={FIXTURES}"]
    assert compare.main([*args, *extra, f"--out={tmp_path / 'cmp'}"]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and "Traceback" not in captured.err
    if "NoSuchModel" in args[1]:
        assert "SASRec" in captured.err and "lightgbm" not in captured.err
    assert not (tmp_path / "cmp" / "runs").exists()


def test_downstream_model_alone_looks_for_an_export_where_run_recbole_saves(tmp_path, capsys):
    # without VLM2Rec in the comparison, VLM2RecSASRec looks under the user's checkpoint_dir (not its run folder)
    out = tmp_path / "cmp"
    code = compare.main(["--dataset=tiny-seq", "--models=VLM2RecSASRec", f"--out={out}", *TINY])
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    error = json.loads((out / "runs" / "VLM2RecSASRec-seed2020" / "failed.json").read_text())["error"]
    assert "no VLM2Rec export of dataset 'tiny-seq'" in error and "checkpoint_dir='saved'" in error
    assert error in (out / "results.md").read_text()


# ------------------------------------------------------------------------ declarations, order, hand-off
def test_models_declare_what_they_export_and_read():
    assert model_outputs("VLM2Rec") == ("item_embeddings",) and model_inputs("VLM2Rec") == ()
    assert model_inputs("VLM2RecSASRec") == ("item_embeddings",) and model_outputs("VLM2RecSASRec") == ()
    assert model_inputs("FDSA") == model_inputs("SASRecF") == ("discrete_item_features",)
    assert model_inputs("SASRec") == model_outputs("SASRec") == ()
    # producers run before their consumers; every other model keeps its place
    assert producers_first(["VLM2RecSASRec", "SASRec", "VLM2Rec"]) == ["VLM2Rec", "VLM2RecSASRec", "SASRec"]
    assert producers_first(["SASRec", "VLM2Rec", "VLM2RecSASRec"]) == ["SASRec", "VLM2Rec", "VLM2RecSASRec"]
    assert producers_first(["VLM2RecSASRec", "FDSA"]) == ["VLM2RecSASRec", "FDSA"]


def test_plan_hands_a_consumer_its_producers_export_of_the_same_seed(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("selected_features: [brand]\n")
    plan = Plan("tiny-mm", ["VLM2RecSASRec", "VLM2Rec", "FDSA", "SASRecF"], [1, 2], tmp_path / "cmp",
                model_configs={"SASRecF": [str(user)]})
    assert plan.models[:2] == ["VLM2Rec", "VLM2RecSASRec"]
    prefix = str(tmp_path / "export" / "item_embeddings")
    records = {("VLM2Rec", 1): {"status": "ok", "run_id": "r1", "exports": {"item_embeddings": prefix}},
               ("VLM2Rec", 2): {"status": "failed"}}
    request, reason = plan.request("VLM2RecSASRec", 1, records)
    assert reason is None and f"--feature_prefix={prefix}" in request["argv"]
    assert request["fingerprint"]["upstream_run"] == "r1" and request["derive_inputs"] == []
    request, reason = plan.request("VLM2RecSASRec", 2, records)
    assert request is None and reason.startswith("needs the item embeddings of VLM2Rec seed 2, and it failed")
    assert plan.request("FDSA", 1, records)[0]["derive_inputs"] == ["discrete_item_features"]
    assert plan.request("SASRecF", 1, records)[0]["derive_inputs"] == []  # the user's own setting wins
    alone = Plan("tiny-mm", ["VLM2RecSASRec"], [1], tmp_path / "cmp")
    assert alone.request("VLM2RecSASRec", 1, {})[0]["derive_inputs"] == ["item_embeddings"]


def test_a_variant_is_a_row_with_its_own_settings_and_name(tmp_path):
    variant = "VLM2RecSASRec + MiniLM text"
    plan = Plan("tiny-mm", [variant, "VLM2RecSASRec", "VLM2Rec"], [1], tmp_path / "cmp", extras=["--epochs=1"],
                variants={variant: Variant("VLM2RecSASRec", ("--feature_prefix=/feat/office", "--epochs=3"))})
    assert plan.models == ["VLM2Rec", variant, "VLM2RecSASRec"]  # the producer first, as for the model itself
    records = {("VLM2Rec", 1): {"status": "ok", "run_id": "r1", "exports": {"item_embeddings": "/x/item_embeddings"}}}
    request, reason = plan.request(variant, 1, records)
    assert reason is None and request["model"] == "VLM2RecSASRec" and request["row"] == variant
    # its own settings replace the command's, and its own feature_prefix replaces the hand-off
    assert request["argv"] == ["--feature_prefix=/feat/office", "--epochs=3", "--seed=1"]
    assert request["fingerprint"]["upstream_run"] is None
    assert plan.run_dir(variant, 1) == (tmp_path / "cmp").resolve() / "runs" / "VLM2RecSASRec_+_MiniLM_text-seed1"
    plain, _ = plan.request("VLM2RecSASRec", 1, records)
    assert plain["argv"] == ["--epochs=1", "--seed=1", "--feature_prefix=/x/item_embeddings"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--variant=small=NoSuchModel --n_layers=1"], "variant 'small': unknown model 'NoSuchModel'"),
        (["--variant=SASRec=SASRec --n_layers=1"], "has the name of a model in --models"),
        (["--variant=small SASRec"], "bad --variant"),
        (["--variant=small=SASRec n_layers=1"], "unexpected 'n_layers=1'"),
        (["--variant=small=SASRec --seed=3"], "cannot be set per row"),
        (["--variant=a b=SASRec", "--variant=a_b=SASRec"], "would share the run folder 'a_b'"),
        (["--variant=small=SASRec", "--variant=small=GRU4Rec"], "variant 'small' is defined twice"),
    ],
)
def test_bad_variants_exit_2(tmp_path, capsys, args, expected):
    assert compare.main(["--dataset=tiny-seq", "--models=SASRec", *args, f"--data_path={FIXTURES}",
                         f"--out={tmp_path / 'cmp'}"]) == 2
    assert expected in capsys.readouterr().err


def test_variants_from_the_command_line_and_a_yaml_file_run_side_by_side(tmp_path, capsys):
    listed = tmp_path / "variants.yaml"
    listed.write_text("GRU4Rec, 2 layers:\n  model: GRU4Rec\n  num_layers: 2\n")
    out = tmp_path / "cmp"
    code = compare.main(["--dataset=tiny-seq", "--models=SASRec", "--variant=SASRec, 2 layers=SASRec --n_layers=2",
                         f"--variants={listed}", f"--out={out}", *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    rows = {row["model"]: row for row in _csv(out / "results.csv")}
    assert list(rows) == ["SASRec", "SASRec, 2 layers", "GRU4Rec, 2 layers"]
    assert all(row["status"] == "ok" for row in rows.values())
    request = json.loads((out / "runs" / "SASRec_2_layers-seed2020" / "request.json").read_text())
    assert request["model"] == "SASRec" and "--n_layers=2" in request["argv"]
    gru = json.loads((out / "runs" / "GRU4Rec_2_layers-seed2020" / "request.json").read_text())
    assert gru["model"] == "GRU4Rec" and "--num_layers=2" in gru["argv"]
    assert int(rows["SASRec, 2 layers"]["params"]) > int(rows["SASRec"]["params"])


def test_vlm2rec_export_is_handed_to_vlm2recsasrec(tmp_path, capsys):
    data = tmp_path / "data"
    write_tiny_multimodal_dataset(data)
    small = tmp_path / "small-sasrec.yaml"
    small.write_text("hidden_size: 16\ninner_size: 32\nn_layers: 1\nn_heads: 1\n")
    out = tmp_path / "cmp"
    args = ["--dataset=tiny-mm", "--models=VLM2RecSASRec,VLM2Rec", f"--out={out}", f"--data_path={data}",
            f"--config_files={FIXTURES / 'vlm2rec-tiny.yaml'}", f"--model_config=VLM2RecSASRec={small}",
            "--epochs=1"]
    code = compare.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    producer = json.loads((out / "runs" / "VLM2Rec-seed2020" / "result.json").read_text())
    consumer_dir = out / "runs" / "VLM2RecSASRec-seed2020"
    consumer = json.loads((consumer_dir / "result.json").read_text())
    prefix = producer["exports"]["item_embeddings"]
    assert Path(prefix).parent.parent == out / "runs" / "VLM2Rec-seed2020" / "saved"
    assert Path(f"{prefix}.text.npy").is_file() and Path(f"{prefix}.image.npy").is_file()
    # the consumer was given, and read, exactly that export
    assert f"--feature_prefix={prefix}" in json.loads((consumer_dir / "request.json").read_text())["argv"]
    assert consumer["feature_prefix"] == prefix
    assert consumer["fingerprint"]["upstream_run"] == producer["run_id"]
    log = (consumer_dir / "run.log").read_text()
    assert re.search(rf"text features: {re.escape(prefix)}\.text\.npy", log), log[-3000:]
    assert re.search(rf"image features: {re.escape(prefix)}\.image\.npy", log)
    assert "best valid" in log and "test result" in log  # RecBole's result lines, as run_recbole logs them
    assert {row["model"]: row["status"] for row in _csv(out / "results.csv")} == {"VLM2Rec": "ok",
                                                                                  "VLM2RecSASRec": "ok"}
    assert {row["model"] for row in _csv(out / "modality.csv")} == {"VLM2Rec"}
    # again: both kept (the consumer's fingerprint names the same producer run)
    assert compare.main(args) == 0
    assert capsys.readouterr().out.count("skipped, finished before") == 2


# ------------------------------------------------------------------------ no model named in the code
def _code_strings(tree):
    """(line, text) of every string constant that is neither a docstring nor argparse help text."""
    excluded = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                excluded.add(id(first.value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            excluded.update(id(sub) for sub in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in excluded:
            yield node.lineno, node.value


def test_compare_package_names_no_model_in_its_code():
    import recbole_vlm2rec.compare as package

    names = set(available_models()) | {"VLM2Rec", "VLM2RecSASRec", "FDSA", "SASRecF"}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
    modules = sorted(Path(package.__file__).parent.glob("*.py"))
    assert {m.name for m in modules} >= {"cli.py", "plan.py", "supervise.py", "child.py", "reports.py"}
    found = []
    for module in modules:
        for line, text in _code_strings(ast.parse(module.read_text(), str(module))):
            if pattern.search(text):
                found.append(f"{module.name}:{line}: {text!r}")
    assert not found, found
