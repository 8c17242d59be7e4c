"""benchmarks/modality_collapse.py: the probe and the summary on hand-made numbers, the catalog's planted
signal, the command line, and the --quick run end to end (its results.json layout)."""
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from helpers import FIXTURES, REPO_ROOT, write_tiny_multimodal_dataset


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("modality_collapse", REPO_ROOT / "benchmarks" / "modality_collapse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_linear_probe_known_answers(bench):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 4
    separable = np.eye(4)[labels] * 3 + rng.normal(0, 0.1, (200, 4))
    assert bench.linear_probe(separable, labels) == 1.0
    unrelated = rng.normal(0, 1, (2000, 8))  # features independent of the labels: chance, 1/4
    assert abs(bench.linear_probe(unrelated, np.arange(2000) % 4) - 0.25) < 0.05
    assert math.isnan(bench.linear_probe(np.zeros((50, 3)), np.arange(50) % 2))  # an absent modality
    # zero rows (items without that modality) are left out, not counted as misses
    assert bench.linear_probe(np.vstack([separable, np.zeros((100, 4))]), np.r_[labels, np.zeros(100, int)]) == 1.0


def _result(bench, row, seed, fused, text, image, valid_fused):
    result = {"row": row, "seed": seed, "epochs": [], "run_s": 1.0}
    for split, value in (("test", fused), ("valid", valid_fused)):
        result[f"{split}_fused_ndcg@10"] = value
        result[f"{split}_text_only_ndcg@10"] = text
        result[f"{split}_image_only_ndcg@10"] = image
    return result


def test_summary_retention_standard_errors_and_validation_selection(bench):
    nan = math.nan
    results = []
    for seed, scale in ((0, 1.0), (1, 2.0)):
        results += [
            _result(bench, "text alone", seed, 0.2 * scale, 0.2 * scale, nan, 0.2),
            _result(bench, "image alone", seed, 0.1 * scale, nan, 0.1 * scale, 0.1),
            _result(bench, "plain", seed, 0.3, 0.2 * scale, 0.05 * scale, 0.30),
            _result(bench, "VLM2Rec", seed, 0.3, 0.1 * scale, 0.1 * scale, 0.31),
            # best on test, not on validation: must not be selected
            _result(bench, "sweep beta=0.5 lambda=0.3", seed, 0.9, 0.1, 0.1, 0.25),
        ]
    rows, selection = bench.summarise(results, [0, 1])
    assert rows["plain"]["text_retention"]["values"] == pytest.approx([1.0, 1.0])
    assert rows["plain"]["image_retention"]["values"] == pytest.approx([0.5, 0.5])
    assert rows["VLM2Rec"]["image_retention"]["mean"] == pytest.approx(1.0)
    assert rows["text alone"]["image_only_ndcg@10"] == {"values": [None, None], "mean": None, "stderr": None}
    text = rows["text alone"]["text_only_ndcg@10"]
    assert text["values"] == pytest.approx([0.2, 0.4]) and text["mean"] == pytest.approx(0.3)
    assert text["stderr"] == pytest.approx(np.std([0.2, 0.4], ddof=1) / math.sqrt(2))
    assert selection["selected"] == "VLM2Rec" and (selection["beta"], selection["lambda"]) == (0.2, 0.1)
    assert rows[bench.SELECTED] == rows["VLM2Rec"]
    assert set(selection["candidates"]) == {"VLM2Rec", "sweep beta=0.5 lambda=0.3"}


def test_learnability_against_the_untrained_row_and_the_ceiling(bench):
    """alone / untrained per seed; the ceiling caps that ratio for a model that knows only the attribute."""
    stat = bench._stats
    rows = {"untrained": {"image_only_ndcg@10": stat([0.02, 0.01]), "text_only_ndcg@10": stat([0.02, 0.02])},
            "image alone": {"image_only_ndcg@10": stat([0.03, 0.03])}}
    ceilings = {"test": {"image": {"ndcg@10": 0.04}, "text": {"ndcg@10": 0.05}}}
    result = bench.learnability(rows, ceilings)
    assert set(result) == {"image"}  # no text-alone row was run
    image = result["image"]
    assert image["alone_over_untrained"]["values"] == pytest.approx([1.5, 3.0])
    assert image["ceiling_over_untrained"]["values"] == pytest.approx([2.0, 4.0])
    assert image["alone_over_ceiling"]["values"] == pytest.approx([0.75, 0.75])
    assert image["gap_closed"]["values"] == pytest.approx([0.5, 2 / 3])  # (0.03 - 0.02) / (0.04 - 0.02), ...
    assert image["ceiling_ndcg@10"] == 0.04
    without = bench.learnability(rows, None)["image"]  # a dataset without planted attributes: the ratio only
    assert set(without) == {"alone_over_untrained"}
    lines = bench.learnability_lines({"ceilings": ceilings, "learnability": result})
    assert lines[1].startswith("image alone / untrained 2.25 ± 0.75; ceiling 0.0400 = 3.00 ± 1.00 x untrained")


def test_the_default_catalog_needs_both_modalities(bench, tmp_path):
    """COLLAPSE_SPEC: oracles that know one planted attribute reach well under the one that knows both."""
    from dataset_tools.synthetic import build_synthetic, oracle_hit_rates

    build_synthetic(tmp_path, "c", bench.COLLAPSE_SPEC, kcore=5, progress=False)
    oracle = oracle_hit_rates(tmp_path / "c", "c", k=10)
    assert oracle["text"] < 0.6 * oracle["both"] and oracle["image"] < 0.6 * oracle["both"]
    assert min(oracle["text"], oracle["image"]) > 2 * oracle["popularity"]


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "modality_collapse.py"), *args],
                          capture_output=True, text=True, timeout=900, cwd=cwd)


def test_command_line_errors_name_the_problem(tmp_path):
    done = _run("--dataset", "mine")
    assert done.returncode == 2 and "--dataset needs --data_path" in done.stderr
    done = _run("--dataset", "mine", "--data_path", str(tmp_path))
    assert done.returncode == 2 and f"no {tmp_path / 'mine' / 'mine.inter'}" in done.stderr
    done = _run("--config_files", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2 and "no file" in done.stderr


def test_quick_run_writes_the_results_layout(tmp_path):
    out = tmp_path / "out"
    done = _run("--quick", "--out", str(out), "--jobs", "2", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["seeds"] == [0]
    required = ["untrained", "text alone", "image alone", "plain", "+WPCL", "+CRTR", "VLM2Rec"]
    assert list(report["rows"])[:7] == required and "VLM2Rec (val-selected)" in report["rows"]
    for name, metrics in report["rows"].items():
        for metric in ("fused_ndcg@10", "text_only_ndcg@10", "image_only_ndcg@10"):
            assert set(metrics[metric]) == {"values", "mean", "stderr"}, (name, metric)
            assert len(metrics[metric]["values"]) == 1
    rows = report["rows"]
    assert rows["text alone"]["image_only_ndcg@10"]["values"] == [None]
    assert rows["image alone"]["text_only_ndcg@10"]["values"] == [None]
    assert 0 < rows["plain"]["fused_ndcg@10"]["mean"] <= 1
    assert rows["text alone"]["text_retention"]["values"] == [1.0]
    assert 0 <= rows["untrained"]["probe_image_pattern"]["mean"] <= 1
    # per-modality validation curve: epoch 0 (untrained) and the one epoch of --quick
    assert len(rows["plain"]["valid_curve"]["image_only"]) == 2
    for name in ("results.md", "modality_metrics.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert "VLM2Rec (val-selected)" in done.stdout and "oracle Hit@10" in done.stdout
    assert set(report["ceilings"]) == {"valid", "test"} and set(report["learnability"]) == {"text", "image"}
    assert 0 < report["ceilings"]["test"]["image"]["ndcg@10"] < report["ceilings"]["test"]["both"]["ndcg@10"]
    assert "image alone / untrained" in done.stdout and "Attribute ceilings" in (out / "results.md").read_text()


def test_own_dataset_with_its_own_settings(tmp_path):
    """--dataset/--data_path/--config_files: a converted catalog with the user's settings; no planted attributes,
    so no probes and no oracle, and only the rows asked for."""
    write_tiny_multimodal_dataset(tmp_path / "data")
    out = tmp_path / "out"
    # --jobs 1 runs in the command's own process, and a relative --out is the caller's directory's
    done = _run("--dataset", "tiny-mm", "--data_path", "data", "--config_files",
                str(FIXTURES / "vlm2rec-tiny.yaml"), "--rows", "untrained,image alone,plain", "--seeds", "0",
                "--epochs", "1", "--jobs", "1", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert list(report["rows"]) == ["untrained", "image alone", "plain"] and report["oracle"] is None
    assert report["ceilings"] is None and set(report["learnability"]["image"]) == {"alone_over_untrained"}
    assert "probe_image_pattern" not in report["rows"]["plain"]
    assert "vlm_name_or_path" not in report["settings"]  # nothing of the synthetic set-up is pinned: the files decide
    assert report["rows"]["image alone"]["image_retention"]["values"] == [1.0]
    assert "oracle Hit@10" not in done.stdout
    done = _run("--rows", "plain,nonsense", "--out", str(out))
    assert done.returncode != 0 and "unknown rows ['nonsense']" in done.stderr
