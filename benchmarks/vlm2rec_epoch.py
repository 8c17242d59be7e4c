"""VLM2Rec training throughput and memory: vision cache off, on, on with length buckets, and on with length
buckets and the chunked (GradCache) step, side by side in one run.

Builds a small synthetic multimodal catalog (``dataset_tools.synthetic``, images at ``--image-size``),
then for each setting, in a fresh process of its own, constructs VLM2Rec through RecBole (Config -> dataset
-> model -> trainer) and times one training epoch (``Trainer._train_epoch``: external fusion, user prompts
with ``max_history_items`` images, WPCL + CRTR, LoRA, gradient checkpointing on a GPU). Prints pairs/s, epoch
time, the share of computed prompt tokens that were padding, the epoch's summed loss (the same in every row up to
rounding: same gradients, same steps) and peak memory: on a GPU the peak allocated, on the CPU how much the
process's peak resident memory grew during the epoch (the activations). The first two rows run one left-padded
forward per prompt batch (``length_buckets: 1``, the path before length buckets), the last two the default
``length_buckets: 4``.

    python benchmarks/vlm2rec_epoch.py                                    # CPU, tiny backbone (~2 min)
    python benchmarks/vlm2rec_epoch.py --backbone random-qwen2-vl-2b      # GPU, real-size random weights

Weights are random: throughput does not depend on their values. Writes
``benchmarks/results/vlm2rec_epoch_<backbone>_<device>.json`` (or into ``--out``).
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_dataset(root: str, users: int, items: int, image_size: int) -> None:
    from dataset_tools.synthetic import SyntheticSpec, build_synthetic

    spec = SyntheticSpec(seed=7, items=items, users=users, image_size=image_size, min_history=5, max_history=10)
    build_synthetic(root, "epoch-bench", spec, kcore=3, progress=False)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_setting(root: str, args, vision_cache: bool, buckets: int, chunk_size) -> dict:
    import torch

    if not torch.cuda.is_available() or args.device == "cpu":
        torch.set_num_threads(1)

    import recbole_vlm2rec  # noqa: F401
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_vlm2rec.models.vlm2rec import VLM2Rec
    from recbole_vlm2rec.trainer import VLM2RecTrainer

    cuda = torch.cuda.is_available() and args.device != "cpu"
    config = Config(
        model="VLM2Rec",
        dataset="epoch-bench",
        config_dict={
            "data_path": root,
            "checkpoint_dir": os.path.join(root, f"saved-{vision_cache}-{buckets}-{chunk_size}"),
            "gpu_id": "0" if cuda else "",
            "show_progress": False,
            "vlm_name_or_path": args.backbone,
            "vlm_dtype": "bf16" if cuda else "fp32",
            "gradient_checkpointing": cuda,
            "finetune": "lora",
            "image_size": args.image_size,
            "max_history_items": 10,
            "train_batch_size": args.batch_size,
            "vision_cache": vision_cache,
            "contrastive_chunk_size": chunk_size,
            "length_buckets": buckets,
            "lora_dropout": 0.0,  # the epoch's loss is then the same with and without chunks (a check)
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    start = time.perf_counter()
    model = VLM2Rec(config, train_data._dataset).to(config["device"])  # warms the vision cache when on
    setup_s = time.perf_counter() - start
    trainer = VLM2RecTrainer(config, model)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    tokens_before = dict(model.encoder.token_stats)  # the catalog warm-up is not the epoch's
    losses = trainer._train_epoch(train_data, 0, show_progress=False)
    if cuda:
        torch.cuda.synchronize()
    epoch_s = time.perf_counter() - start
    pairs = len(train_data.dataset)
    result = {
        "vision_cache": vision_cache,
        "contrastive_chunk_size": chunk_size,
        "length_buckets": buckets,
        # summed over the epoch's steps; the same with and without chunks (same gradients, same steps)
        "epoch_loss": float(sum(losses) if isinstance(losses, tuple) else losses),
        "pairs": pairs,
        "epoch_s": epoch_s,
        "pairs_per_s": pairs / epoch_s,
        "setup_s": setup_s,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "cpu_peak_rss_growth_mb": float("nan") if cuda else _peak_rss_mb() - rss_before,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    real, computed = (model.encoder.token_stats[k] - tokens_before[k] for k in ("real", "computed"))
    result["padding_share"] = 1 - real / computed if computed else 0.0  # of the prompt tokens computed
    return result


def run_in_own_process(root: str, args, vision_cache: bool, buckets: int, chunk_size) -> dict:
    """One setting in a fresh process: peak memory is then the setting's own, and no cache is warm."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(run_setting, root, args, vision_cache, buckets, chunk_size).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-qwen2-vl", help="tiny-qwen2-vl, random-qwen2-vl-2b, a path, ...")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on a GPU, 56 on the CPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=8, help="contrastive_chunk_size of the chunked row")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder of the JSON (default benchmarks/results)")
    args = parser.parse_args()
    import torch

    args.image_size = args.image_size or (224 if torch.cuda.is_available() and args.device != "cpu" else 56)

    root = tempfile.mkdtemp(prefix="vlm2rec-epoch-")
    build_dataset(root, args.users, args.items, args.image_size)
    settings = [(False, 1, None), (True, 1, None), (True, 4, None), (True, 4, args.chunk_size)]
    results = [run_in_own_process(root, args, cache, buckets, chunk) for cache, buckets, chunk in settings]

    device = results[0]["device"]
    print(f"VLM2Rec one training epoch, backbone {args.backbone}, {device}, "
          f"{args.image_size} px, batch {args.batch_size}, LoRA, external fusion, 10-item user histories")
    memory = "peak GB" if device != "cpu" else "RSS+ MB"
    print(f"{'vision cache':<13} {'buckets':>7} {'chunk':>6} {'pairs':>6} {'epoch s':>8} {'pairs/s':>8} "
          f"{'padding':>8} {memory:>8} {'loss':>9} {'setup s':>8}")
    for r in results:
        peak = r["peak_gb"] if device != "cpu" else r["cpu_peak_rss_growth_mb"]
        print(f"{str(r['vision_cache']):<13} {r['length_buckets']:>7} {str(r['contrastive_chunk_size'] or '-'):>6} "
              f"{r['pairs']:>6} {r['epoch_s']:>8.1f} {r['pairs_per_s']:>8.2f} {r['padding_share']:>8.1%} {peak:>8.2f} "
              f"{r['epoch_loss']:>9.4f} {r['setup_s']:>8.1f}")
    off, on, bucketed, chunked = results
    print(f"speed-up from the vision cache: {on['pairs_per_s'] / off['pairs_per_s']:.2f}x")
    print(f"length buckets (4 vs 1): {bucketed['pairs_per_s'] / on['pairs_per_s']:.2f}x the pairs/s, padding "
          f"{on['padding_share']:.1%} -> {bucketed['padding_share']:.1%} of the computed prompt tokens")
    print(f"chunked step (contrastive_chunk_size {args.chunk_size}): {chunked['pairs_per_s'] / bucketed['pairs_per_s']:.2f}x "
          f"the pairs/s of the whole batch at once")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "_", os.path.basename(args.backbone.rstrip("/")).lower()).strip("_")
    where = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "_", device.lower().replace("nvidia", "")).strip("_")
    path = os.path.join(out, f"vlm2rec_epoch_{name}_{where}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump({"backbone": args.backbone, "batch_size": args.batch_size, "image_size": args.image_size,
                   "results": results}, handle, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
