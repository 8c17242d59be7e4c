#!/usr/bin/env python
"""Throughput of the VLM encoder against the plain transformers forward, side by side (issue 4).

For each architecture, on random weights (throughput does not depend on their values):

* vision cache warm-up: images/s (decode + vision tower + store), bytes per image on disk;
* forward passes, plain transformers forward (pixels through the vision tower on every call) vs our
  encoder with the vision cache: item image+text in one prompt (internal fusion), item text + item
  image prompts (external fusion, ``encode_items``), user histories of 10 items (text + 10 images);
* catalog export: ``VLMEncoder.encode_catalog`` of the whole synthetic catalog + ``.npy``/``.json`` export;
* one LoRA training step (external fusion, InfoNCE, ``pairs`` user/item pairs): plain vs cached,
  with peak GPU memory.

The plain path gets its inputs ready on the device (tokenised, padded, pixels preprocessed) before the
clock starts; our numbers include everything (prompts, tokenising, cache reads). Each section fails
soft: an error is printed and the run goes on.

    python benchmarks/encoder_throughput.py                       # CPU, tiny backbone, < 3 min
    python benchmarks/encoder_throughput.py --device cuda --arch qwen2_vl_2b,qwen2_5_vl_3b --out bench_out

On a GPU: bf16, SDPA, gradient checkpointing for training, LoRA r16 on the language model's linear layers.
"""
import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = {
    "tiny": "tiny-qwen2-vl", "tiny_qwen2_5_vl": "tiny-qwen2.5-vl", "tiny_qwen3_vl": "tiny-qwen3-vl",
    "qwen2_vl_2b": "random-qwen2-vl-2b", "qwen2_5_vl_3b": "random-qwen2.5-vl-3b",
}
# Batch sizes and counts per device kind: the GPU ones are those of docs/design.md#anchors-h200.
SIZES = {
    "cuda": dict(items=128, users=16, pairs=32, catalog=512, iters=3, train_iters=2),
    "cpu": dict(items=16, users=4, pairs=8, catalog=48, iters=5, train_iters=2),
}
WORDS = ("matte lipstick serum cream shampoo brush mirror perfume running shoe jacket glove yoga bottle puzzle doll "
         "robot train card board game dress skirt jeans sweater coat ring red blue green black white gold silver "
         "small large soft organic vegan waterproof classic premium professional pack set kit piece natural bright "
         "women men kids baby beauty sports outdoors toys clothing jewelry face body hair nail bath").split()


def import_encoder():
    """Import ``recbole_vlm2rec.encoder``; where RecBole is not installed (a bare GPU machine), load it
    without the plugin package's RecBole registration, which the encoder does not need."""
    sys.path.insert(0, REPO)
    try:
        import recbole_vlm2rec.encoder as encoder
    except ImportError:
        import types

        for name in [m for m in sys.modules if m == "recbole_vlm2rec" or m.startswith("recbole_vlm2rec.")]:
            del sys.modules[name]
        package = types.ModuleType("recbole_vlm2rec")
        package.__path__ = [os.path.join(REPO, "recbole_vlm2rec")]
        sys.modules["recbole_vlm2rec"] = package
        import recbole_vlm2rec.encoder as encoder
    return encoder


def make_catalog(directory, n, seed=0, px=256):
    """n items: a text of 20-30 catalog words and a JPEG (colour gradient, a rectangle, noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    texts, paths = [], []
    yy, xx = np.mgrid[0:px, 0:px] / px
    for i in range(n):
        texts.append(" ".join(rng.choice(WORDS, size=int(rng.integers(20, 31)))))
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = (c0 * (1 - xx[..., None]) + c1 * yy[..., None]).astype(np.float32)
        y0, x0 = rng.integers(0, px // 2, 2)
        img[y0:y0 + px // 3, x0:x0 + px // 3] = rng.integers(0, 256, 3)
        img += rng.normal(0, 8, img.shape)
        path = os.path.join(directory, f"item{i}.jpg")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return texts, paths


class Bench:
    def __init__(self, device, iters):
        self.device, self.iters = torch.device(device), iters

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        return torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None

    def time(self, fn, iters=None, warmup=1):
        """Seconds per call after ``warmup`` calls, calls back to back as in a loop over batches: the
        CPU may prepare the next call while the GPU still runs the last one (one sync at the end)."""
        for _ in range(warmup):
            fn()
        self.sync()
        iters = iters or self.iters
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t) / iters


def run_arch(arch, args, sizes, device, dtype, enc_mod, workdir):
    """All sections for one architecture; returns the result dict (errors recorded per section)."""
    from recbole_vlm2rec.encoder.inputs import open_image
    sys.path.insert(0, os.path.join(REPO, "tests"))  # the plain transformers path lives with the tests
    from reference_forward import plain_forward, plain_inputs

    res = {"arch": arch, "sections": {}, "errors": {}}
    bench = Bench(device, sizes["iters"])
    t0 = time.time()
    cfg_common = dict(vlm_name_or_path=ARCHS[arch], vlm_dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
                      attn_implementation="sdpa", image_size=args.image_size, max_text_tokens=64,
                      vision_cache_dtype="bf16", lora_r=16, lora_alpha=32, lora_dropout=0.0,
                      gradient_checkpointing=True)
    backbone = enc_mod.load_backbone(enc_mod.EncoderConfig(**cfg_common), device=device)
    enc = enc_mod.VLMEncoder(enc_mod.EncoderConfig(**cfg_common, finetune="frozen"), cache_dir=workdir,
                             backbone=backbone)
    n_params = sum(p.numel() for p in enc.parameters())
    res.update(params_B=n_params / 1e9, build_s=time.time() - t0, hidden=enc.hidden_size,
               tokens_per_image=enc.image_preprocessor.tokens_per_image, dtype=str(dtype).replace("torch.", ""))
    print(f"\n== {arch} ({ARCHS[arch]}): {_params(n_params)} params, hidden {enc.hidden_size}, "
          f"{args.image_size} px = {enc.image_preprocessor.tokens_per_image} visual tokens, built in {res['build_s']:.1f} s", flush=True)

    texts, paths = make_catalog(workdir, sizes["catalog"], seed=0)
    rng = np.random.default_rng(1)
    B, U, P = sizes["items"], sizes["users"], sizes["pairs"]
    hist = [list(rng.choice(len(texts), 10, replace=False)) for _ in range(max(U, P))]

    def section(name, fn):
        try:
            out = fn()
            res["sections"][name] = out
            print(f"  {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in out.items()), flush=True)
        except Exception as err:  # one failing section must not cost the others
            res["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"  {name} FAILED: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc(limit=4)
        finally:
            bench.reset_peak()

    def pils(idx):
        return [open_image(paths[i], args.image_size)[0] for i in idx]

    # -- vision cache warm-up (everything below reads the cache) -----------------------------------------
    def warm():
        batch = 64 if device.type == "cuda" else 16
        enc.warm_vision_cache(paths[:batch], batch_size=batch, progress=False)  # kernels' first-call costs
        t = time.perf_counter()
        stats = enc.warm_vision_cache(paths, batch_size=batch, progress=False)
        bench.sync()
        s = time.perf_counter() - t
        per_image = enc.vision_cache.nbytes / max(1, len(enc.vision_cache))
        return {"images_per_s": stats["computed"] / s, "computed": stats["computed"], "bytes_per_image": per_image,
                "GB_per_10k_images": per_image * 1e4 / 1e9}
    section("vision_cache_warm", warm)

    texts_t = enc.prompt_tokenizer.truncate(texts, enc.config.max_text_tokens)
    item_idx = list(range(B))
    item_texts = [texts[i] for i in item_idx]
    item_paths = [paths[i] for i in item_idx]

    def compare(plain_fn, ours_fn, n, unit="items"):
        bench.reset_peak()
        with torch.no_grad():
            s_plain = bench.time(plain_fn)
            mem_plain = bench.peak_gb()
            bench.reset_peak()
            s_ours = bench.time(ours_fn)
            mem_ours = bench.peak_gb()
        out = {f"plain_{unit}_per_s": n / s_plain, f"ours_{unit}_per_s": n / s_ours, "speedup": s_plain / s_ours}
        if mem_plain is not None:
            out.update(plain_peak_GB=mem_plain, ours_peak_GB=mem_ours)
        return out

    # -- item image + text in one prompt (internal fusion; the form of the anchors in docs/design.md#anchors-h200) -------------
    def item_interleaved():
        prompts = [enc.prompts.interleaved_item(texts_t[i], True) for i in item_idx]
        inputs = plain_inputs(enc, prompts, pils(item_idx))
        out = compare(lambda: plain_forward(enc, inputs), lambda: enc.encode_interleaved_items(item_texts, item_paths), B)
        out["tokens"] = inputs["input_ids"].shape[1]
        # The bound for any vision cache: the language model alone on ready inputs (tokens, visual tokens on the GPU).
        with torch.no_grad():
            batch = enc.prompt_tokenizer.batch(enc.prompt_tokenizer.encode(prompts)).to(device)
            visual = enc._visual(item_paths)[1]
            out["lm_only_items_per_s"] = B / bench.time(lambda: enc._forward(batch, visual))
        return out
    section("item_image_text_one_prompt", item_interleaved)

    # -- item text + item image prompts (external fusion, encode_items) ------------------------------------
    def item_external():
        text_in = plain_inputs(enc, [enc.prompts.item_text(texts_t[i]) for i in item_idx], [])
        image_in = plain_inputs(enc, [enc.prompts.item_image()] * B, pils(item_idx))
        out = compare(lambda: (plain_forward(enc, text_in), plain_forward(enc, image_in)),
                      lambda: enc.encode_items(item_texts, item_paths), B)
        out["tokens"] = f"{text_in['input_ids'].shape[1]}+{image_in['input_ids'].shape[1]}"
        return out
    section("item_text_and_image_prompts", item_external)

    # -- user histories: 10 items, text prompt + 10-image prompt -------------------------------------------
    def users():
        h = hist[:U]
        ht = [[texts[i] for i in row] for row in h]
        hi = [[paths[i] for i in row] for row in h]
        text_in = plain_inputs(enc, [enc.prompts.user_text(enc.prompt_tokenizer.truncate(t, enc.config.max_text_tokens)) for t in ht], [])
        image_in = plain_inputs(enc, [enc.prompts.user_image(10)] * U, pils([i for row in h for i in row]))
        out = compare(lambda: (plain_forward(enc, text_in), plain_forward(enc, image_in)),
                      lambda: enc.encode_users(ht, hi), U, unit="users")
        out["tokens"] = f"{text_in['input_ids'].shape[1]}+{image_in['input_ids'].shape[1]}"
        return out
    section("user_history_10_items", users)

    # -- catalog export (warm vision cache) ----------------------------------------------------------------
    def catalog():
        prefix = os.path.join(workdir, "export", "items")

        def run():  # cache=False: time the encoding, not the item-embedding cache
            emb = enc.encode_catalog(texts, paths, batch_size=B, progress=False, cache=False)
            arrays = {m: emb[m].cpu().numpy() for m in ("text", "image", "fused")}
            enc_mod.export_item_embeddings(prefix, [f"i{k}" for k in range(len(texts))], arrays, enc.describe())
        s = bench.time(run, iters=max(1, sizes["iters"] - 1))
        enc.encode_catalog(texts, paths, batch_size=B, progress=False)  # kept
        t = time.perf_counter()
        enc.encode_catalog(texts, paths, batch_size=B, progress=False)
        hit = time.perf_counter() - t
        return {"items_per_s": len(texts) / s, "items": len(texts), "repeat_with_item_cache_s": hit}
    section("catalog_export", catalog)

    # -- one LoRA training step, external fusion, InfoNCE -------------------------------------------------
    def training():
        lora_enc = enc_mod.VLMEncoder(enc_mod.EncoderConfig(**cfg_common, finetune="lora"), cache_dir=workdir,
                                      backbone=backbone)
        lora_enc.train()
        opt = torch.optim.AdamW([p for p in lora_enc.parameters() if p.requires_grad], lr=1e-4)
        h = hist[:P]
        ht = [[texts[i] for i in row] for row in h]
        hi = [[paths[i] for i in row] for row in h]
        pos = [int(rng.integers(len(texts))) for _ in range(P)]
        it, ip = [texts[i] for i in pos], [paths[i] for i in pos]
        target = torch.arange(P, device=device)

        def loss_step(u, i):
            logits = u @ i.T / 0.05
            torch.nn.functional.cross_entropy(logits, target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def ours():
            users = lora_enc.encode_users(ht, hi)
            items = lora_enc.encode_items(it, ip)
            loss_step(users.fused(), items.fused())

        plain_parts = [
            plain_inputs(lora_enc, [lora_enc.prompts.user_text(lora_enc.prompt_tokenizer.truncate(t, 64)) for t in ht], []),
            plain_inputs(lora_enc, [lora_enc.prompts.user_image(10)] * P, pils([i for row in h for i in row])),
            plain_inputs(lora_enc, [lora_enc.prompts.item_text(t) for t in lora_enc.prompt_tokenizer.truncate(it, 64)], []),
            plain_inputs(lora_enc, [lora_enc.prompts.item_image()] * P, pils(pos)),
        ]

        def plain():
            e = [plain_forward(lora_enc, q) for q in plain_parts]
            norm = torch.nn.functional.normalize
            loss_step(norm(e[0] + e[1], dim=-1), norm(e[2] + e[3], dim=-1))

        bench.reset_peak()
        s_ours = bench.time(ours, iters=sizes["train_iters"])
        mem_ours = bench.peak_gb()
        bench.reset_peak()
        s_plain = bench.time(plain, iters=sizes["train_iters"])
        mem_plain = bench.peak_gb()
        out = {"plain_pairs_per_s": P / s_plain, "ours_pairs_per_s": P / s_ours, "speedup": s_plain / s_ours,
               "pairs": P}
        if mem_plain is not None:
            out.update(plain_peak_GB=mem_plain, ours_peak_GB=mem_ours)
        return out
    section("lora_train_step", training)

    res["total_s"] = time.time() - t0
    return res  # the models go with this frame; main() then empties the GPU cache


def _params(n):
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


ROWS = [  # (section, label, plain key, ours key)
    ("item_image_text_one_prompt", "item image+text, one prompt", "plain_items_per_s", "ours_items_per_s", "items/s"),
    ("item_text_and_image_prompts", "item text + image prompts", "plain_items_per_s", "ours_items_per_s", "items/s"),
    ("user_history_10_items", "user history, 10 items+images", "plain_users_per_s", "ours_users_per_s", "users/s"),
    ("catalog_export", "catalog encode+export (warm)", None, "items_per_s", "items/s"),
    ("vision_cache_warm", "vision cache warm-up", None, "images_per_s", "images/s"),
    ("lora_train_step", "LoRA train step", "plain_pairs_per_s", "ours_pairs_per_s", "pairs/s"),
]


def print_table(results, sizes):
    for r in results:
        if "sections" not in r:
            print(f"\n{r['arch']}: FAILED before any section: {r.get('error')}")
            continue
        s = r["sections"]
        print(f"\n{r['arch']}  ({_params(r['params_B'] * 1e9)} params, {r['dtype']}, {r['tokens_per_image']} visual tokens/image; "
              f"batches: items {sizes['items']}, users {sizes['users']}, train pairs {sizes['pairs']})")
        print(f"{'path':34s} {'plain HF':>14s} {'ours (cache)':>14s} {'speedup':>8s} {'peak GB plain/ours':>19s}  unit")
        for key, label, pk, ok, unit in ROWS:
            if key in r["errors"]:
                print(f"{label:34s} FAILED: {r['errors'][key][:80]}")
                continue
            if key not in s:
                continue
            row = s[key]
            plain = row.get(pk) if pk else None
            if key == "catalog_export" and "item_text_and_image_prompts" in s:  # same work: two prompts per item
                plain = s["item_text_and_image_prompts"]["plain_items_per_s"]
            speed = f"{row[ok] / plain:7.2f}x" if plain else ""
            mem = f"{row['plain_peak_GB']:.1f} / {row['ours_peak_GB']:.1f}" if "plain_peak_GB" in row else ""
            print(f"{label:34s} {(_fmt(plain) if plain else '-'):>14s} {_fmt(row[ok]):>14s} {speed:>8s} {mem:>19s}  {unit}")
            if "lm_only_items_per_s" in row:
                bound = row["lm_only_items_per_s"]
                print(f"{'  bound: language model only':34s} {'':>14s} {_fmt(bound):>14s} {bound / plain:7.2f}x "
                      f"{'':>19s}  {unit}")
        if "vision_cache_warm" in s:
            w = s["vision_cache_warm"]
            print(f"vision cache on disk: {w['bytes_per_image']:.0f} bytes/image = {w['GB_per_10k_images']:.2f} GB per 10k images")


def cache_size_note(enc_mod):
    """Disk size of the vision cache per 10k items at 224 px, bf16, from the real-size configs."""
    from recbole_vlm2rec.encoder.tiny import BUILTIN_BACKBONES, builtin_config

    lines = []
    for arch in ("qwen2_vl_2b", "qwen2_5_vl_3b"):
        cfg = builtin_config(*BUILTIN_BACKBONES[ARCHS[arch]])
        v = cfg.vision_config
        tokens = (224 // v.patch_size // v.spatial_merge_size) ** 2
        hidden = cfg.text_config.hidden_size
        per = tokens * hidden * 2
        lines.append(f"  {arch}: {tokens} tokens x {hidden} x 2 B = {per:,} B/image -> {per * 1e4 / 1e9:.2f} GB "
                     f"({per * 1e4 / 2 ** 30:.2f} GiB) per 10k items at 224 px")
    return "vision cache size (computed, bf16):\n" + "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch", default=None, help=f"comma list of {', '.join(ARCHS)} (default: tiny on CPU, "
                                                 "qwen2_vl_2b,qwen2_5_vl_3b on a GPU)")
    p.add_argument("--out", default=None, help="directory for encoder_throughput_<arch>.json")
    p.add_argument("--image-size", type=int, default=224)
    for k in ("items", "users", "pairs", "catalog", "iters", "train_iters"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    args = p.parse_args()

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # the 2-core CI machine: more threads make small ops much slower
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = dict(SIZES[device.type])
    sizes.update({k: getattr(args, k) for k in sizes if getattr(args, k, None) is not None})
    archs = (args.arch or ("tiny" if device.type == "cpu" else "qwen2_vl_2b,qwen2_5_vl_3b")).split(",")
    for a in archs:
        if a not in ARCHS:
            p.error(f"unknown --arch {a!r}; choose from {', '.join(ARCHS)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    enc_mod = import_encoder()
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})",
               torch=torch.__version__, transformers=transformers.__version__, peft=peft_version,
               python=platform.python_version(), sizes=sizes)
    print(f"encoder throughput: {env}", flush=True)

    results = []
    t_start = time.time()
    for arch in archs:
        with tempfile.TemporaryDirectory(prefix=f"enc_bench_{arch}_") as workdir:
            try:
                r = run_arch(arch, args, sizes, device, dtype, enc_mod, workdir)
            except Exception as err:
                traceback.print_exc(limit=6)
                r = {"arch": arch, "error": f"{type(err).__name__}: {err}"}
            r["env"] = env
            results.append(r)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, f"encoder_throughput_{arch}.json"), "w") as f:
                    json.dump(r, f, indent=1, default=str)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(results, sizes)
    print(cache_size_note(enc_mod))
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
