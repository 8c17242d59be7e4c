"""End to end: what vlm2rec-data writes, RecBole's SASRec trains on (through ``python -m recbole_vlm2rec``,
i.e. the ``run_recbole`` command). One epoch each, on the tiny release fixtures and on vlm2rec-demo."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_tools.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "amazon"
TEMPLATE = REPO / "properties" / "dataset" / "amazon-template.yaml"


def run_recbole(cwd, *args):
    cmd = [sys.executable, "-m", "recbole_vlm2rec", "--model=SASRec", "--epochs=1", "--gpu_id=", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The three release fixtures converted (text only) into one data path."""
    data = tmp_path_factory.mktemp("data")
    for release, reviews, meta, kcore in (("2014", "reviews.json", "meta.json", "3"),
                                          ("2018", "reviews.json", "meta.json", "2"),
                                          ("2023", "reviews.jsonl", "meta.jsonl", "3")):
        assert main(["amazon", "--reviews", str(FIXTURES / release / reviews), "--meta", str(FIXTURES / release / meta),
                     "--out", str(data), "--dataset", f"fx{release}", "--kcore", kcore, "--no-progress"]) == 0
    return data


@pytest.mark.parametrize("release", ["2014", "2018", "2023"])
def test_sasrec_trains_on_converted_fixture(tmp_path, converted, release):
    # The fixtures have 4-5 items: cut-offs above that make RecBole's top-k fail, so use @2.
    proc = run_recbole(tmp_path, f"--dataset=fx{release}", f"--data_path={converted}",
                       f"--config_files={TEMPLATE}", "--topk=[2]", "--valid_metric=NDCG@2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test result" in proc.stdout + proc.stderr


def test_sasrec_on_demo_builds_it_into_an_empty_data_path(tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    # Demo histories hold at most 20 items: a 20-item cap changes nothing but halves the CPU time.
    proc = run_recbole(tmp_path, "--dataset=vlm2rec-demo", f"--data_path={data}", "--MAX_ITEM_LIST_LENGTH=20")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "test result" in out and "ndcg@10" in out
    assert (data / "vlm2rec-demo" / "vlm2rec-demo.stats.json").is_file()
