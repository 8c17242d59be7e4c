"""SASRec epoch time: stock RecBole 1.2.1 vs RecBole with the recbole-vlm2rec layer, side by side.

Both runs train the same SASRec on the same generated fixture, each in a fresh process, one thread:

* ``stock``: RecBole as installed, with only the numpy aliases it needs to start at all on numpy 2
  (without them ``Config()`` fails); ``sine.py`` leaves autograd anomaly mode on, as it does for every user.
* ``ours``: ``import recbole_vlm2rec`` (the whole compatibility layer).

Usage: python benchmarks/recbole_overhead.py [--users 800] [--epochs 2]
Prints a table with seconds per training epoch and the stock/ours ratio (we measured ~2.2x on ml-100k).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

DATASET = "overhead-fixture"


def write_fixture(root: str, users: int, items: int, seed: int = 0) -> None:
    """A deterministic sequential dataset: users walk through item clusters (lengths 8-20)."""
    rng = random.Random(seed)
    folder = os.path.join(root, DATASET)
    os.makedirs(folder, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(users):
        item = rng.randrange(items)
        for step in range(rng.randint(8, 20)):
            item = (item + rng.choice([1, 2, 3, 5, 8])) % items
            lines.append(f"{user}\t{item}\t{user * 100 + step}")
    with open(os.path.join(folder, f"{DATASET}.inter"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def child(mode: str, data_path: str, epochs: int) -> None:
    import torch

    torch.set_num_threads(1)
    if mode == "ours":
        import recbole_vlm2rec  # noqa: F401
    else:
        import numpy as np

        for old, new in {"float_": "float64", "complex_": "complex128", "unicode_": "str_", "bool8": "bool_"}.items():
            if old not in np.__dict__:
                setattr(np, old, getattr(np, new))
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    config = Config(
        model="SASRec",
        dataset=DATASET,
        config_dict={
            "data_path": data_path,
            "gpu_id": "",
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "train_neg_sample_args": None,
            "show_progress": False,
            "train_batch_size": 256,
            "MAX_ITEM_LIST_LENGTH": 20,
            "checkpoint_dir": tempfile.mkdtemp(),
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    model = SASRec(config, train_data._dataset)
    trainer = Trainer(config, model)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        trainer._train_epoch(train_data, epoch, show_progress=False)
        times.append(time.perf_counter() - start)
    print(json.dumps({"epoch_s": times, "anomaly": torch.is_anomaly_enabled(), "examples": len(train_data.dataset)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=800)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", choices=["stock", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.epochs)
        return

    root = tempfile.mkdtemp(prefix="recbole-overhead-")
    write_fixture(root, args.users, args.items)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results = {}
    for mode in ("stock", "ours"):
        command = [sys.executable, __file__, "--child", mode, "--data", root, "--epochs", str(args.epochs)]
        output = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
        if output.returncode != 0:
            sys.exit(f"{mode} run failed:\n{output.stderr[-3000:]}")
        results[mode] = json.loads(output.stdout.strip().splitlines()[-1])

    print(f"SASRec on a generated fixture ({results['ours']['examples']} training sequences), CPU, 1 thread")
    print(f"{'setup':<10} {'anomaly mode':>12} {'s/epoch (mean)':>15} {'epochs':>7}")
    for mode, result in results.items():
        mean = sum(result["epoch_s"]) / len(result["epoch_s"])
        results[mode]["mean"] = mean
        print(f"{mode:<10} {str(result['anomaly']):>12} {mean:>15.2f} {len(result['epoch_s']):>7}")
    print(f"stock/ours epoch-time ratio: {results['stock']['mean'] / results['ours']['mean']:.2f}x")


if __name__ == "__main__":
    main()
