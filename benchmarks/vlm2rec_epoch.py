"""VLM2Rec training throughput, vision cache off vs on, side by side in one run.

Builds a small synthetic multimodal catalog (``dataset_tools.synthetic``, images at ``--image-size``),
then for each setting constructs VLM2Rec through RecBole (Config -> dataset -> model -> trainer) and times
one training epoch (``Trainer._train_epoch``: external fusion, user prompts with ``max_history_items``
images, WPCL + CRTR, LoRA, gradient checkpointing). Prints pairs/s, epoch time and peak GPU memory.

    python benchmarks/vlm2rec_epoch.py                                    # CPU, tiny backbone (~1 min)
    python benchmarks/vlm2rec_epoch.py --backbone random-qwen2-vl-2b      # GPU, real-size random weights

Weights are random: throughput does not depend on their values.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_dataset(root: str, users: int, items: int, image_size: int) -> None:
    from dataset_tools.synthetic import SyntheticSpec, build_synthetic

    spec = SyntheticSpec(seed=7, items=items, users=users, image_size=image_size, min_history=5, max_history=10)
    build_synthetic(root, "epoch-bench", spec, kcore=3, progress=False)


def run_setting(root: str, args, vision_cache: bool) -> dict:
    import torch

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
            "checkpoint_dir": os.path.join(root, f"saved-{vision_cache}"),
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
    start = time.perf_counter()
    trainer._train_epoch(train_data, 0, show_progress=False)
    if cuda:
        torch.cuda.synchronize()
    epoch_s = time.perf_counter() - start
    pairs = len(train_data.dataset)
    result = {
        "vision_cache": vision_cache,
        "pairs": pairs,
        "epoch_s": epoch_s,
        "pairs_per_s": pairs / epoch_s,
        "setup_s": setup_s,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-qwen2-vl", help="tiny-qwen2-vl, random-qwen2-vl-2b, a path, ...")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--items", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on a GPU, 56 on the CPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write results.json here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() or args.device == "cpu":
        torch.set_num_threads(1)
    args.image_size = args.image_size or (224 if torch.cuda.is_available() and args.device != "cpu" else 56)

    root = tempfile.mkdtemp(prefix="vlm2rec-epoch-")
    build_dataset(root, args.users, args.items, args.image_size)
    results = [run_setting(root, args, cache) for cache in (False, True)]

    print(f"VLM2Rec one training epoch, backbone {args.backbone}, {results[0]['device']}, "
          f"{args.image_size} px, batch {args.batch_size}, LoRA, external fusion, 10-item user histories")
    print(f"{'vision cache':<13} {'pairs':>6} {'epoch s':>8} {'pairs/s':>8} {'peak GB':>8} {'setup s':>8}")
    for r in results:
        print(f"{str(r['vision_cache']):<13} {r['pairs']:>6} {r['epoch_s']:>8.1f} {r['pairs_per_s']:>8.2f} "
              f"{r['peak_gb']:>8.2f} {r['setup_s']:>8.1f}")
    print(f"speed-up from the vision cache: {results[1]['pairs_per_s'] / results[0]['pairs_per_s']:.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "vlm2rec_epoch.json"), "w") as handle:
            json.dump({"backbone": args.backbone, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
