"""RecBole's distributed path (``run_recbole --nproc``) on CPUs: a gloo process group instead of NCCL
(recbole_vlm2rec/compat/distributed.py), two processes on this machine's cores; cross-device negatives
(recbole_vlm2rec/cross_device.py)."""
import glob
import os
import re
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recbole_vlm2rec.cross_device import gather_rows, leave_process_group

from helpers import FIXTURES, run_cli, vlm2rec_model_and_batch, write_tiny_multimodal_dataset


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sasrec_trains_and_tests_with_two_cpu_processes(tmp_path):
    done = run_cli(["--model=SASRec", "--dataset=tiny-seq", f"--data_path={FIXTURES}",
                    f"--config_files={FIXTURES / 'tiny-seq.yaml'}", "--nproc=2", "--gpu_id=", "--epochs=2",
                    f"--port={_free_port()}", f"--checkpoint_dir={tmp_path / 'saved'}"], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("test result:") == 1  # rank 0 reports, as RecBole does on GPUs
    checkpoints = glob.glob(str(tmp_path / "saved" / "SASRec-*.pth"))
    assert len(checkpoints) == 1  # one name for every rank, written once, read back by both after fit


def _test_result(output: str) -> dict:
    line = next(line for line in output.splitlines() if "test result:" in line)
    return {k: float(v) for k, v in re.findall(r"'([a-z]+(?:@\d+)?)'[,:] (?:np\.float64\()?([0-9.]+)", line)}


def test_evaluation_with_two_processes_equals_one_process_on_the_same_checkpoint(tmp_path):
    # 59 users: RecBole's DistributedSampler pads rank 1's share with a repeat of the first user, and each
    # rank's metrics were rounded before RecBole averaged them
    data = tmp_path / "data" / "tiny-odd"
    data.mkdir(parents=True)
    lines = (FIXTURES / "tiny-seq" / "tiny-seq.inter").read_text().splitlines()
    data.joinpath("tiny-odd.inter").write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.split("\t")[0] != "u1"]))
    settings = [f"--data_path={tmp_path / 'data'}", f"--config_files={FIXTURES / 'tiny-seq.yaml'}", "--gpu_id=",
                "--metrics=['Recall','MRR','NDCG','Hit','Precision','MAP','GAUC']", "--topk=[3,10]"]
    done = run_cli(["--model=SASRec", "--dataset=tiny-odd", *settings, "--nproc=2", "--epochs=2",
                    f"--port={_free_port()}", f"--checkpoint_dir={tmp_path / 'saved'}"], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    two_processes = _test_result(output)
    (checkpoint,) = glob.glob(str(tmp_path / "saved" / "SASRec-*.pth"))

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    config = Config(model="SASRec", dataset="tiny-odd", config_file_list=[str(FIXTURES / "tiny-seq.yaml")],
                    config_dict={"data_path": str(tmp_path / "data"), "gpu_id": "", "topk": [3, 10],
                                 "metrics": ["Recall", "MRR", "NDCG", "Hit", "Precision", "MAP", "GAUC"]})
    _, _, test_data = data_preparation(config, create_dataset(config))
    assert test_data.sample_size == 59
    model = SASRec(config, test_data._dataset)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    one_process = dict(Trainer(config, model).evaluate(test_data, load_best_model=False))
    assert len(two_processes) == 13 and two_processes == {k: float(v) for k, v in one_process.items()}


def test_vlm2rec_trains_tests_and_exports_once_with_two_cpu_processes(tmp_path):
    write_tiny_multimodal_dataset(tmp_path / "data")
    done = run_cli(["--model=VLM2Rec", "--dataset=tiny-mm", f"--data_path={tmp_path / 'data'}",
                    f"--config_files={FIXTURES / 'vlm2rec-tiny.yaml'}", "--nproc=2", "--gpu_id=", "--epochs=1",
                    f"--port={_free_port()}", f"--checkpoint_dir={tmp_path / 'saved'}"], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("test result:") == 1 and output.count("exported:") == 1
    assert "cross_device_negatives: each step gathers" in output  # said, not hidden
    (checkpoint,) = glob.glob(str(tmp_path / "saved" / "VLM2Rec-*.pth"))
    # the export equals one process's re-export of the checkpoint
    from recbole_vlm2rec.item_embeddings import load_item_embeddings  # first: the plugin's numpy aliases

    from recbole.quick_start import load_data_and_model

    config, model, dataset, _, _, test_data = load_data_and_model(checkpoint)
    model.eval()
    catalog = model.catalog_embeddings()
    tokens = list(dataset.field2id_token["item_id"][1:])
    for modality in ("text", "image", "fused"):
        exported, _ = load_item_embeddings(checkpoint[:-4] + "/item_embeddings", modality, expected_tokens=tokens)
        np.testing.assert_allclose(exported, catalog[modality][1:].numpy(), atol=1e-6)
    # and the printed test metrics (each process scored half of the users against the sharded catalog) are
    # one process's evaluation of the checkpoint
    from recbole_vlm2rec.trainer import VLM2RecTrainer

    assert config["single_spec"] and test_data.sample_size == 80
    one_process = VLM2RecTrainer(config, model).evaluate(test_data, load_best_model=False)
    assert _test_result(output) == {k: float(v) for k, v in one_process.items()}


def _join_group(rank: int, world: int, port: int) -> None:
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value pairs from sys.argv
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")


def _leave_group() -> None:
    """End a worker once its results are saved: leave the group, then exit without running the interpreter's
    teardown. A gloo rank has twice (in CI, never locally) aborted *after* its work in that teardown
    ("terminate called without an active exception", SIGABRT), which failed a test whose results were
    complete; the assertions read the saved files, so nothing is lost by skipping it."""
    leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    _join_group(rank, world, port)
    rows = 3 if rank == 0 else 2  # shards of different lengths
    x = torch.full((rows, 2), float(rank + 1), requires_grad=True)
    ids = torch.arange(rows) + 10 * rank
    mask = torch.tensor([True, False, True][:rows])
    gathered = gather_rows(x)
    weights = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    (gathered * weights).sum().backward()  # every rank the same loss of the global rows
    torch.save({"x": gathered.detach(), "ids": gather_rows(ids), "mask": gather_rows(mask), "grad": x.grad,
                "none": gather_rows(None)}, f"{out}/rank{rank}.pt")
    _leave_group()


def test_gather_rows_concatenates_uneven_shards_and_sums_their_gradients(tmp_path):
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for got in (first, second):
        assert torch.equal(got["x"], torch.tensor([[1.0, 1.0]] * 3 + [[2.0, 2.0]] * 2))
        assert torch.equal(got["ids"], torch.tensor([0, 1, 2, 10, 11]))
        assert got["mask"].dtype == torch.bool and got["mask"].tolist() == [True, False, True, True, False]
        assert got["none"] is None
    weights = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    # both ranks computed the same loss: each row's gradient is the sum over the two ranks, 2 * weights
    assert torch.equal(first["grad"], 2 * weights[:3]) and torch.equal(second["grad"], 2 * weights[3:])


def _trainable_gradients(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _training_step_worker(rank: int, world: int, port: int, data: str, out: str, overrides: dict) -> None:
    from recbole_vlm2rec.compat.distributed import distributed_data_parallel

    _join_group(rank, world, port)
    model, batch = vlm2rec_model_and_batch(data, **overrides)
    model.train()
    share = len(batch) // world
    shard = batch[torch.arange(rank * share, (rank + 1) * share)]
    # RecBole's Trainer: DDP's reduce hooks armed by an identity forward, every parameter in the loss
    wrapped = distributed_data_parallel(model)
    forward, model.forward = model.forward, (lambda x: x)
    wrapped(torch.LongTensor([0]))
    model.forward = forward
    wpcl, crtr = model.calculate_loss(shard)
    (wpcl + crtr + sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)).backward()
    torch.save({"loss": (wpcl + crtr).detach(), "weak": model.objective.detector.weak,
                "ignored_by_ddp": set(wrapped.parameters_to_ignore),
                "gradients": _trainable_gradients(model), "cross_device": model.cross_device_negatives},
               f"{out}/rank{rank}.pt")
    _leave_group()


@pytest.mark.parametrize("chunk_size", [None, 5])  # 5: the chunked (GradCache) step, 16 rows per process
def test_two_processes_with_half_batches_match_one_process_with_the_whole_batch(tmp_path, chunk_size):
    data = tmp_path / "data"
    write_tiny_multimodal_dataset(data)
    overrides = {"finetune": "lora", "lora_r": 4, "lora_dropout": 0.0}  # dropout: other masks per process
    model, batch = vlm2rec_model_and_batch(data, **overrides)
    overrides["contrastive_chunk_size"] = chunk_size  # the reference is the plain step of one process
    model.train()
    assert not model.cross_device_negatives and len(batch) == 32
    wpcl, crtr = model.calculate_loss(batch)
    (wpcl + crtr).backward()
    expected = _trainable_gradients(model)
    assert expected and all("lora" in name for name in expected)

    mp.spawn(_training_step_worker, args=(2, _free_port(), str(data), str(tmp_path), overrides), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["cross_device"]
        # the frozen backbone is neither broadcast nor hooked by DDP; the adapters are
        assert got["ignored_by_ddp"] == {name for name, p in model.named_parameters() if not p.requires_grad}
        assert torch.allclose(got["loss"], (wpcl + crtr).detach(), atol=1e-6), (rank, got["loss"], wpcl + crtr)
        assert got["weak"] == model.objective.detector.weak  # the detector decided on the global batch
        for name, gradient in expected.items():
            assert torch.allclose(got["gradients"][name], gradient, atol=1e-5), name


def _catalog_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    _join_group(rank, world, port)
    model, _ = vlm2rec_model_and_batch(data, item_encode_batch_size=8)
    torch.save(model.catalog_embeddings(shard=True), f"{out}/rank{rank}.pt")
    _leave_group()


def test_sharded_catalog_encoding_equals_one_process(tmp_path):
    data = tmp_path / "data"
    write_tiny_multimodal_dataset(data)
    model, _ = vlm2rec_model_and_batch(data, item_encode_batch_size=8)
    expected = model.catalog_embeddings()
    mp.spawn(_catalog_worker, args=(2, _free_port(), str(data), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (rank, name)


def _tiny_encoder(cache_dir):
    from recbole_vlm2rec.encoder import EncoderConfig, VLMEncoder

    config = EncoderConfig(vlm_name_or_path="tiny-qwen2-vl", vlm_dtype="fp32", image_size=28, finetune="frozen")
    return VLMEncoder(config, cache_dir=str(cache_dir))


def _cached_tokens(encoder, images) -> dict:
    from recbole_vlm2rec.encoder.inputs import image_key

    keys = [image_key(path) for path in images]
    rows = encoder.vision_cache.lookup(keys)
    assert (rows >= 0).all()
    return dict(zip(keys, encoder.vision_cache.get(rows)))


def _vision_cache_worker(rank: int, world: int, port: int, images: list, out: str) -> None:
    _join_group(rank, world, port)
    from recbole_vlm2rec.encoder.vision_cache import VisionCache

    written, put = [], VisionCache.put
    VisionCache.put = lambda cache, keys, values: written.extend(keys) or put(cache, keys, values)
    encoder = _tiny_encoder(f"{out}/shared")
    stats = encoder.warm_vision_cache(images, batch_size=2, progress=False, shard=True)
    torch.save({"stats": stats, "tokens": _cached_tokens(encoder, images), "written": written}, f"{out}/rank{rank}.pt")
    _leave_group()


def test_vision_cache_warmed_by_two_processes_equals_one_process(tmp_path):
    from PIL import Image

    images = []
    for i in range(7):
        path = tmp_path / f"image{i}.png"
        Image.new("RGB", (28, 28), (30 * i, 255 - 30 * i, 7 * i)).save(path)
        images.append(str(path))
    single = _tiny_encoder(tmp_path / "single")
    assert single.warm_vision_cache(images + images[:2], batch_size=2, progress=False)["computed"] == 7
    expected = _cached_tokens(single, images)
    mp.spawn(_vision_cache_worker, args=(2, _free_port(), images + images[:2], str(tmp_path)), nprocs=2)
    shares = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [share["stats"]["computed"] for share in shares] == [4, 3]  # each process its share, once
    assert len(shares[0]["written"]) == 7 and shares[1]["written"] == []  # one writer: process 0
    for share in shares:  # and each reads every image's tokens afterwards
        assert set(share["tokens"]) == set(expected)
        for key, tokens in expected.items():
            assert torch.equal(share["tokens"][key], tokens), key


def test_vlm2recsasrec_trains_with_two_cpu_processes(tmp_path):
    from recbole_vlm2rec.item_embeddings import export_item_embeddings

    write_tiny_multimodal_dataset(tmp_path / "data")
    rng = np.random.default_rng(0)
    tokens = [f"i{i}" for i in range(40)]
    arrays = {m: rng.standard_normal((40, 8)).astype(np.float32) for m in ("text", "image")}
    export_item_embeddings(str(tmp_path / "features" / "tiny"), tokens, arrays, metadata={"dataset": "tiny-mm"})
    done = run_cli(["--model=VLM2RecSASRec", "--dataset=tiny-mm", f"--data_path={tmp_path / 'data'}",
                    f"--config_files={FIXTURES / 'tiny-seq.yaml'}", f"--feature_prefix={tmp_path / 'features' / 'tiny'}",
                    "--nproc=2", "--gpu_id=", "--epochs=2", f"--port={_free_port()}",
                    f"--checkpoint_dir={tmp_path / 'saved'}"], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("test result:") == 1 and "cross_device_negatives: each step gathers" in output
    assert "epoch 1 modality: L^T" in output  # the diagnostics of the gathered batch, logged by rank 0
