"""Numbers users can trust: printed test metrics and exports come from the saved (best) weights, a reloaded
model evaluates in a fresh process, runs never overwrite each other, a damaged checkpoint says so."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import recbole_vlm2rec  # noqa: F401
from helpers import FIXTURES, REPO_ROOT, write_tiny_multimodal_dataset
from recbole.quick_start import run_recbole

from recbole_vlm2rec.compat import CorruptCheckpointError, load_checkpoint
from recbole_vlm2rec.item_embeddings import load_item_embeddings

VLM2REC_YAML = str(FIXTURES / "vlm2rec-tiny.yaml")
TINY_SEQ_YAML = str(FIXTURES / "tiny-seq.yaml")


def _env():
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    return env


def _python(code, cwd, timeout=600):
    """Run ``code`` as a script in a fresh interpreter (nothing of this process's numpy state carries over;
    a script file, not ``-c``, so that spawned children can import its functions)."""
    script = os.path.join(cwd, "script.py")
    with open(script, "w") as handle:
        handle.write(code)
    result = subprocess.run([sys.executable, script], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_test_metrics_and_export_come_from_the_best_epoch_not_the_last(tmp_path, monkeypatch):
    """Best epoch 0 of 3: the last validation encoded the catalog with epoch 2's weights, which must not be
    what the test evaluation and the export use after RecBole reloads epoch 0's weights."""
    from recbole_vlm2rec.trainer import VLM2RecTrainer

    original = VLM2RecTrainer._valid_epoch
    calls = []

    def valid_epoch(self, valid_data, show_progress=False):
        score, result = original(self, valid_data, show_progress)  # encodes the catalog, as a real run does
        calls.append(score)
        return 1.0 - 0.1 * len(calls), result  # epoch 0 is the best, whatever the real scores

    monkeypatch.setattr(VLM2RecTrainer, "_valid_epoch", valid_epoch)
    data = tmp_path / "data"
    write_tiny_multimodal_dataset(data)
    result = run_recbole(model="VLM2Rec", dataset="tiny-mm", config_file_list=[VLM2REC_YAML],
                         config_dict=dict(data_path=str(data), epochs=3, learning_rate=0.01, stopping_step=10,
                                          modality_dropout_eval=False))
    assert len(calls) == 3
    [checkpoint] = glob.glob(str(tmp_path / "saved" / "VLM2Rec-*.pth"))
    export = os.path.splitext(checkpoint)[0]
    logged = result["test_result"]

    out = tmp_path / "reexport"
    reloaded = json.loads(_python(f"""
import json, torch
torch.set_num_threads(1)
import recbole_vlm2rec
from recbole.utils import get_trainer
config, model, dataset, train_data, valid_data, test_data = recbole_vlm2rec.load_data_and_model({checkpoint!r})
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
model.export({str(out)!r}, dataset.field2id_token[dataset.iid_field])
print(json.dumps(dict(result)))
""", cwd=tmp_path).strip().splitlines()[-1])
    assert set(reloaded) == set(logged)
    for metric, value in logged.items():
        assert abs(value - reloaded[metric]) <= 1e-6, (metric, value, reloaded[metric])
    for modality in ("text", "image", "fused"):
        exported, meta = load_item_embeddings(os.path.join(export, "item_embeddings"), modality)
        again, _ = load_item_embeddings(str(out / "item_embeddings"), modality)
        np.testing.assert_allclose(exported, again, atol=1e-6, rtol=0)
        assert meta["checkpoint"] == os.path.abspath(checkpoint)


def _train_and_reload_code(model, data_path, config_file, extra):
    return f"""
import glob, json, torch
torch.set_num_threads(1)
import recbole_vlm2rec
from recbole.quick_start import run_recbole
run_recbole(model={model!r}, dataset={os.path.basename(data_path)!r}, config_file_list=[{config_file!r}],
            config_dict=dict(data_path={os.path.dirname(data_path)!r}, epochs=1, **{extra!r}))
print(json.dumps(sorted(glob.glob("saved/{model}-*.pth"))))
"""


@pytest.mark.parametrize("model", ["SASRec", "VLM2Rec", "VLM2RecSASRec"])
def test_reloaded_model_evaluates_in_a_fresh_process(tmp_path, model):
    """``load_data_and_model`` + ``trainer.evaluate`` in a process that never built a Config itself (RecBole's
    own numpy aliases never ran there: NDCG needs ``np.float``)."""
    extra = {}
    if model == "VLM2Rec":
        write_tiny_multimodal_dataset(tmp_path / "data")
        data_path, config_file = str(tmp_path / "data" / "tiny-mm"), VLM2REC_YAML
        extra = {"modality_dropout_eval": False}
    else:
        data_path, config_file = str(FIXTURES / "tiny-seq"), TINY_SEQ_YAML
        if model == "VLM2RecSASRec":
            from test_vlm2rec_sasrec import write_features

            write_features(tmp_path / "features" / "own")
            extra = {"feature_prefix": str(tmp_path / "features" / "own")}
    [checkpoint] = json.loads(_python(_train_and_reload_code(model, data_path, config_file, extra), cwd=tmp_path)
                              .strip().splitlines()[-1])
    out = _python(f"""
import torch
torch.set_num_threads(1)
import recbole_vlm2rec
from recbole.quick_start import load_data_and_model
from recbole.utils import get_trainer
config, model, dataset, train_data, valid_data, test_data = load_data_and_model({checkpoint!r})
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
print("RESULT", dict(trainer.evaluate(test_data, load_best_model=False, show_progress=False)))
""", cwd=tmp_path)
    assert "RESULT" in out and "ndcg@10" in out and "np.float64" not in out


def test_numpy_names_recbole_needs_exist_in_a_spawned_worker(tmp_path):
    """Spawned workers (``run_recbole --nproc``) import the plugin and nothing else before RecBole runs."""
    out = _python("""
import multiprocessing as mp

def probe(queue):
    import recbole_vlm2rec  # what cli._worker does first
    import numpy as np
    from recbole.evaluator.metrics import NDCG
    names = ["float", "int", "bool", "object", "str", "complex", "long", "unicode", "float_", "complex_", "unicode_"]
    queue.put([name for name in names if not hasattr(np, name)])

if __name__ == "__main__":
    queue = mp.get_context("spawn").SimpleQueue()
    worker = mp.get_context("spawn").Process(target=probe, args=(queue,))
    worker.start(); worker.join()
    print("MISSING", queue.get() if worker.exitcode == 0 else f"worker failed ({worker.exitcode})")
""", cwd=tmp_path, timeout=120)
    assert "MISSING []" in out, out


def _start_run(model, cwd, args):
    """Start ``run_recbole`` in a process whose clock is frozen, as for two runs started in one second."""
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "import recbole.utils, recbole.trainer.trainer as t\n"
        "frozen = lambda: 'Dec-02-2026_00-00-00'\n"
        "recbole.utils.get_local_time = t.get_local_time = frozen\n"
        "from recbole_vlm2rec.cli import main\nsys.exit(main())\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, f"--model={model}", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_started_together_keep_two_checkpoints_and_two_exports(tmp_path):
    write_tiny_multimodal_dataset(tmp_path / "data")
    args = ["--dataset=tiny-mm", f"--config_files={VLM2REC_YAML}", f"--data_path={tmp_path / 'data'}",
            "--epochs=1", f"--checkpoint_dir={tmp_path / 'shared'}", "--modality_dropout_eval=False"]
    runs = [_start_run("VLM2Rec", tmp_path, args) for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
    checkpoints = sorted(glob.glob(str(tmp_path / "shared" / "VLM2Rec-*.pth")))
    assert len(checkpoints) == 2, checkpoints
    for checkpoint in checkpoints:
        meta = json.load(open(os.path.join(checkpoint[:-4], "item_embeddings.fused.json")))
        assert meta["checkpoint"] == checkpoint


def test_damaged_checkpoints_are_reported_as_damaged(tmp_path):
    import torch

    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}}, good)
    raw = good.read_bytes()
    cases = {
        "truncated.pth": raw[: len(raw) // 2],
        "random.pth": np.random.default_rng(0).bytes(2048),
        "empty.pth": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CorruptCheckpointError, match=name):
            load_checkpoint(tmp_path / name)
    # a well-formed zip whose pickle is garbage (a disk error inside the file)
    damaged = bytearray(raw)
    start = raw.index(b"data.pkl") + len(b"data.pkl")
    damaged[start + 64: start + 96] = b"\xff" * 32
    (tmp_path / "damaged.pth").write_bytes(bytes(damaged))
    with pytest.raises(CorruptCheckpointError, match="damaged.pth"):
        load_checkpoint(tmp_path / "damaged.pth")
    assert load_checkpoint(good)["state_dict"]["w"].sum() == 3
