"""benchmarks/modality_collapse.py: its core on a very small synthetic catalog, a few steps per setting."""
import csv
import importlib.util
import math
import sys

from helpers import REPO_ROOT


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("modality_collapse", REPO_ROOT / "benchmarks" / "modality_collapse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_settings_train_alike_and_report_every_modality(tmp_path):
    from dataset_tools.synthetic import SyntheticSpec

    bench = _load_benchmark()
    root = str(tmp_path / "data")
    bench.build_catalog(root, SyntheticSpec(seed=3, items=50, users=60, image_size=32, min_history=5, max_history=7),
                        kcore=3)
    results, steps = bench.run_benchmark(root, ["untrained", "plain", "VLM2Rec"], [0], epochs=1,
                                         overrides={"train_batch_size": 32}, log=lambda *_: None,
                                         param_grad_every=2)
    by_name = {r["setting"]: r for r in results}
    assert list(by_name) == ["untrained", "plain", "VLM2Rec"]
    assert by_name["untrained"]["steps"] == 0 and math.isnan(by_name["untrained"]["grad_ratio_mean"])
    # same data, same number of steps for every trained setting
    assert by_name["plain"]["steps"] == by_name["VLM2Rec"]["steps"] > 0
    assert (by_name["plain"]["beta"], by_name["plain"]["lambda"]) == (0.0, 0.0)
    assert (by_name["VLM2Rec"]["beta"], by_name["VLM2Rec"]["lambda"]) == (0.2, 0.1)
    for row in results:
        for split in ("valid", "test"):
            for mode in bench.MODES:
                for metric in bench.METRICS:
                    assert 0.0 <= row[f"{split}_{mode}_{metric}"] <= 1.0
    for name in ("plain", "VLM2Rec"):
        row = by_name[name]
        assert math.isfinite(row["grad_ratio_mean"]) and row["grad_ratio_mean"] > 0
        assert 0.0 <= row["weak_image_share"] <= 1.0
        assert math.isfinite(row["param_grad_ratio_mean"]) and row["param_grad_ratio_mean"] > 0
    # under external fusion the embedding-level ratio of a loss on fused scores alone is exactly 1
    assert abs(by_name["plain"]["grad_ratio_mean"] - 1.0) < 1e-3
    # plain contrastive has no CRTR term; VLM2Rec's weighted CRTR is positive
    assert all(s["loss_crtr_weighted"] == 0.0 for s in steps if s["setting"] == "plain")
    assert any(s["loss_crtr_weighted"] > 0.0 for s in steps if s["setting"] == "VLM2Rec")

    out = tmp_path / "out"
    paths = bench.write_outputs(str(out), results, steps, "test run", {"both": 0.5, "text": 0.3})
    for name in ("results.csv", "results.md", "per_step.csv", "modality_metrics.png", "grad_ratio.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(paths) == 5
    with open(out / "per_step.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(steps)
    table = bench.format_text_table(bench.table_rows(results))
    assert table.splitlines()[0].startswith("setting") and "VLM2Rec" in table
