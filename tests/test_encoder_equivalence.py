"""The encoder computes what the plain transformers forward computes, on every family, with and without
the vision cache, and its gradients do not depend on where the visual tokens come from."""
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_vlm2rec.encoder import EncoderConfig, VLMEncoder
from recbole_vlm2rec.encoder.inputs import open_image, rope_positions
from reference_forward import plain_forward, plain_inputs

FAMILIES = [("tiny-qwen2-vl", 56), ("tiny-qwen2.5-vl", 56), ("tiny-qwen3-vl", 64)]
TEXTS = ["Red matte lipstick, 3 pack", "", "Blue running shoe for men with a breathable mesh upper " * 3,
         "Wooden puzzle"]


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 70, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _encoder(name, size, tmp_path, **kw):
    cfg = dict(vlm_name_or_path=name, vlm_dtype="fp32", image_size=size, finetune="frozen",
               vision_cache_dtype="fp32", max_text_tokens=24)
    cfg.update(kw)
    return VLMEncoder(EncoderConfig(**cfg), cache_dir=str(tmp_path))


def _load(paths, size):
    return [open_image(p, size)[0] for p in paths]


@pytest.mark.parametrize("name,size", FAMILIES)
@torch.no_grad()
def test_embeddings_equal_plain_forward(name, size, image_paths, tmp_path):
    for cache in (True, False):
        enc = _encoder(name, size, tmp_path, vision_cache=cache)
        images = [image_paths[0], None, image_paths[1], image_paths[2]]
        items = enc.encode_items(TEXTS, images)
        texts = enc.prompt_tokenizer.truncate(TEXTS, 24)

        # Text prompts one by one (unpadded) and as one left-padded batch.
        for i, t in enumerate(texts):
            if not t:  # no text: a masked zero row, not the embedding of an empty prompt
                assert not items.text_mask[i] and not items.text[i].any()
                continue
            ref = plain_forward(enc, plain_inputs(enc, [enc.prompts.item_text(t)], []))
            torch.testing.assert_close(items.text[i:i + 1], ref, atol=1e-5, rtol=0)
        assert items.text_mask.tolist() == [True, False, True, True]
        # Image prompts as one batch with pixels through the model's own vision tower.
        ok = [0, 2, 3]
        ref = plain_forward(enc, plain_inputs(enc, [enc.prompts.item_image()] * 3,
                                              _load([images[i] for i in ok], size)))
        torch.testing.assert_close(items.image[ok], ref, atol=1e-5, rtol=0)
        assert items.image_mask.tolist() == [True, False, True, True]
        assert torch.all(items.image[1] == 0)

        # Multi-image user histories and interleaved prompts, rows of different lengths, one batch.
        hist_t = [["a", "b", "c"], ["d"], ["e", "f"]]
        hist_i = [[image_paths[3], image_paths[4], None], [None], [image_paths[5], image_paths[0]]]
        users = enc.encode_users(hist_t, hist_i)
        ref = plain_forward(enc, plain_inputs(enc, [enc.prompts.user_image(2), enc.prompts.user_image(2)],
                                              _load([image_paths[3], image_paths[4], image_paths[5], image_paths[0]], size)))
        torch.testing.assert_close(users.image[[0, 2]], ref, atol=1e-5, rtol=0)
        assert users.image_mask.tolist() == [True, False, True]

        inter = enc.encode_interleaved_users(hist_t, hist_i)
        prompts = [enc.prompts.interleaved_user(t, [i is not None for i in imgs]) for t, imgs in zip(hist_t, hist_i)]
        flat = [p for imgs in hist_i for p in imgs if p is not None]
        ref = plain_forward(enc, plain_inputs(enc, prompts, _load(flat, size)))
        torch.testing.assert_close(inter, ref, atol=1e-5, rtol=0)

        inter_items = enc.encode_interleaved_items(TEXTS, images)
        prompts = [enc.prompts.interleaved_item(t, i is not None) for t, i in zip(texts, images)]
        ref = plain_forward(enc, plain_inputs(enc, prompts, _load([i for i in images if i], size)))
        torch.testing.assert_close(inter_items, ref, atol=1e-5, rtol=0)
        assert torch.allclose(inter_items.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("name,size", FAMILIES)
def test_rope_positions_match_the_models_rope_index(name, size, image_paths, tmp_path):
    enc = _encoder(name, size, tmp_path)
    prompts = [enc.prompts.user_image(3), enc.prompts.item_text("short"),
               enc.prompts.interleaved_user(["x", "y"], [True, False])]
    batch = enc.prompt_tokenizer.batch(enc.prompt_tokenizer.encode(prompts))
    kwargs = dict(image_grid_thw=enc.image_preprocessor.grid_thw(4), attention_mask=batch.attention_mask)
    if "mm_token_type_ids" in inspect.signature(enc.base_model.get_rope_index).parameters:  # transformers 5
        kwargs["mm_token_type_ids"] = (batch.input_ids == enc.prompt_tokenizer.image_token_id).int()
    ref, _ = enc.base_model.get_rope_index(batch.input_ids, **kwargs)
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, valid], ref[:, valid])
    ours = rope_positions(batch.input_ids, batch.attention_mask, enc.prompt_tokenizer.image_token_id,
                          enc.image_preprocessor.tokens_per_image, enc.image_preprocessor.merged_side)
    assert torch.equal(ours, batch.position_ids)


@pytest.mark.parametrize("name,size", FAMILIES)
def test_cached_and_uncached_give_equal_embeddings_and_lora_gradients(name, size, image_paths, tmp_path):
    enc = _encoder(name, size, tmp_path, finetune="lora", lora_r=4, lora_dropout=0.0)
    enc.train()
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))

    def step(use_cache):
        enc.config.vision_cache = use_cache
        enc.zero_grad(set_to_none=True)
        items = enc.encode_items(TEXTS[:3], [image_paths[0], None, image_paths[1]])
        users = enc.encode_users([["a", "b"], ["c"], ["d"]],
                                 [[image_paths[2], image_paths[3]], [image_paths[4]], [None]])
        logits = users.fused() @ items.fused().T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(3))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}
        return items, users, grads

    cached_items, cached_users, cached_grads = step(True)
    items, users, grads = step(False)
    torch.testing.assert_close(cached_items.image, items.image, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached_users.image, users.image, atol=1e-6, rtol=0)
    assert grads and grads.keys() == cached_grads.keys()
    assert all(k.count("lora_") and ".language_model." in k for k in grads)  # vision tower untouched
    for k in grads:
        torch.testing.assert_close(cached_grads[k], grads[k], atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for k, g in grads.items() if "lora_A" in k)


def test_full_finetune_and_autocast(image_paths, tmp_path):
    enc = _encoder("tiny-qwen2-vl", 56, tmp_path, finetune="full", train_vision_tower=True)
    assert not enc.uses_vision_cache
    enc.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc.encode_items(TEXTS[:2], [image_paths[0], image_paths[1]])
        loss = (out.text * out.image).sum()
    loss.backward()
    assert torch.isfinite(out.text).all() and torch.isfinite(out.image).all()
    vis = [p.grad for n, p in enc.named_parameters() if ".visual." in n]
    assert vis and any(g is not None and g.abs().sum() > 0 for g in vis)
