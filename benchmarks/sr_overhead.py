"""VLM2RecSASRec vs SASRec: training epoch time and peak memory on the real Amazon Beauty interactions.

The interactions are ``shared/data/amazon-beauty-2014-5core/Beauty.inter.json`` (22,363 users, 12,101 items,
198,502 interactions), converted with ``vlm2rec-data from-sequences`` into a temporary folder; every item gets
random 2048-d text and image features (the width of a Qwen2.5-VL-3B embedding) in VLM2Rec's export format.
Each model trains in a fresh process of this run, with the same data, encoder size, batch size and threads:

* ``SASRec``: RecBole's own, CE over all items;
* ``VLM2RecSASRec frozen``: frozen 2048-d features + adapters + ID embedding, WPCL and CRTR on (defaults);
* ``VLM2RecSASRec finetune``: trainable per-modality tables initialised from the features.

Memory is the peak resident set size sampled during the training epochs (CPU) or
``torch.cuda.max_memory_allocated`` (GPU), so data loading does not count. Target: VLM2RecSASRec's epoch time
at most 1.5x SASRec's.

Usage: python benchmarks/sr_overhead.py [--max-users 2000] [--epochs 1] [--device cpu|cuda] [--threads 1]
The defaults take about 3 minutes on one CPU thread. All 22,363 users (``--max-users 0``) take about half an
hour on one CPU thread and under 2 minutes on one GPU (``--device cuda --epochs 3``).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

BEAUTY = "/work/shared/data/amazon-beauty-2014-5core/Beauty.inter.json"
DATASET = "beauty"
FEATURE_DIM = 2048
VARIANTS = {
    "SASRec": ("SASRec", {}),
    "VLM2RecSASRec frozen": ("VLM2RecSASRec", {"item_init": "frozen"}),
    "VLM2RecSASRec finetune": ("VLM2RecSASRec", {"item_init": "finetune"}),
}


def prepare(root: str, source: str, max_users: int) -> str:
    """Beauty (optionally its first ``max_users`` users) as RecBole atomic files, plus random features."""
    import numpy as np

    from dataset_tools.sequences import convert_sequences
    from recbole_vlm2rec.item_embeddings import export_item_embeddings

    with open(source, encoding="utf-8") as handle:
        sequences = json.load(handle)
    if max_users:
        sequences = dict(list(sequences.items())[:max_users])
    subset = os.path.join(root, "sequences.json")
    with open(subset, "w", encoding="utf-8") as handle:
        json.dump(sequences, handle)
    convert_sequences(subset, root, DATASET)
    tokens = sorted({str(item) for items in sequences.values() for item in items})
    rng = np.random.default_rng(0)
    arrays = {}
    for modality in ("text", "image"):
        array = rng.standard_normal((len(tokens), FEATURE_DIM), dtype=np.float32)
        arrays[modality] = array / np.linalg.norm(array, axis=1, keepdims=True)  # like VLM2Rec's L2 output
    prefix = os.path.join(root, "features", "beauty")
    export_item_embeddings(prefix, tokens, arrays, {"backbone": f"random {FEATURE_DIM}-d"})
    return prefix


class PeakRSS:
    """Samples this process's resident set size every few milliseconds while active."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def child(variant: str, root: str, prefix: str, epochs: int, device: str, threads: int, batch: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import recbole_vlm2rec  # noqa: F401  (compat layer, our models)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    model_name, extra = VARIANTS[variant]
    config = Config(
        model=model_name,
        dataset=DATASET,
        config_dict={
            "data_path": root,
            "gpu_id": "" if device == "cpu" else "0",
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "show_progress": False,
            "train_batch_size": batch,
            "MAX_ITEM_LIST_LENGTH": 50,
            "hidden_size": 64,
            "inner_size": 256,
            "n_layers": 2,
            "n_heads": 2,
            "feature_prefix": prefix,
            "checkpoint_dir": os.path.join(root, "saved"),
            **extra,
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    interactions = dataset.inter_num  # before data_preparation, which leaves the dataset split
    train_data, _, _ = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(model_name)(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    cuda = config["device"].type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as rss:
        for epoch in range(epochs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer._train_epoch(train_data, epoch, show_progress=False)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    print(
        json.dumps(
            {
                "epoch_s": times,
                "peak_bytes": peak,
                "memory": "CUDA allocated" if cuda else "RSS",
                "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "sequences": len(train_data.dataset),
                "users": dataset.user_num - 1,
                "items": dataset.item_num - 1,
                "interactions": interactions,
                "device": torch.cuda.get_device_name() if cuda else f"CPU, {threads} thread(s)",
            }
        )
    )


def epoch_seconds(result: dict) -> float:
    """Mean epoch time; the first epoch holds one-off costs (CUDA kernel loading) and is left out when there
    are more."""
    times = result["epoch_s"][1:] or result["epoch_s"]
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=BEAUTY, help="Beauty.inter.json (per-user ordered item lists)")
    parser.add_argument("--max-users", type=int, default=2000, help="first N users only; 0 = all (default 2000)")
    parser.add_argument("--epochs", type=int, default=1, help="timed training epochs per model (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=2048, help="train_batch_size (RecBole's default 2048)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.prefix, args.epochs, args.device, args.threads, args.batch)
        return

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="sr-overhead-") as root:
        prefix = prepare(root, args.data, args.max_users)
        threads = str(args.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        results = {}
        for variant in VARIANTS:
            command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--root", root,
                       "--prefix", prefix, "--epochs", str(args.epochs), "--device", args.device,
                       "--threads", threads, "--batch", str(args.batch)]
            output = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
            if output.returncode != 0:
                sys.exit(f"{variant} run failed:\n{output.stderr[-3000:]}")
            results[variant] = json.loads(output.stdout.strip().splitlines()[-1])

    first = results["SASRec"]
    print(
        f"Amazon Beauty 5-core: {first['users']} users, {first['items']} items, {first['interactions']} interactions "
        f"({first['sequences']} training sequences), batch {args.batch}, hidden 64, 2 layers, "
        f"{FEATURE_DIM}-d text + image features; {first['device']}; "
        + (f"s/epoch: mean of epochs 2..{args.epochs}" if args.epochs > 1 else "s/epoch: one epoch")
    )
    base = epoch_seconds(first)
    memory = f"peak {first['memory']} (MiB)"
    header = f"| {'model':<24} | {'s/epoch':>8} | {'x SASRec':>8} | {memory:>25} | {'trainable params':>16} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for variant, result in results.items():
        mean = epoch_seconds(result)
        print(
            f"| {variant:<24} | {mean:>8.2f} | {mean / base:>8.2f} | {result['peak_bytes'] / 2**20:>25.0f} "
            f"| {result['params']:>16,} |"
        )


if __name__ == "__main__":
    main()
