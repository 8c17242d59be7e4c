"""Length buckets (``length_buckets``): the cheapest split of a batch by prompt length, and embeddings and
gradients equal to the one padded forward's."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_vlm2rec.encoder import EncoderConfig, VLMEncoder
from recbole_vlm2rec.encoder.buckets import length_buckets, visual_token_index


def _computed(lengths, groups):
    lengths = np.asarray(lengths)
    return sum(len(g) * lengths[g].max() for g in groups)


def _brute_force(lengths, k):
    """Fewest computed tokens over every split of the distinct lengths (longest first) into <= k runs."""
    values = sorted(set(lengths), reverse=True)
    best = None
    for n in range(1, min(k, len(values)) + 1):
        for cuts in itertools.combinations(range(1, len(values)), n - 1):
            bounds = [0, *cuts, len(values)]
            cost = sum(values[a] * sum(1 for x in lengths if values[b - 1] <= x <= values[a])
                       for a, b in zip(bounds, bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


def test_known_split():
    groups = length_buckets([5, 9, 5, 2, 9], 2)
    # {9, 9} and {5, 5, 2}: 2*9 + 3*5 = 33 tokens; {9, 9, 5, 5} and {2} would be 38
    assert [g.tolist() for g in groups] == [[1, 4], [0, 2, 3]]
    assert _computed([5, 9, 5, 2, 9], groups) == 33


def test_one_bucket_is_the_padded_batch_and_few_lengths_need_no_padding():
    assert [g.tolist() for g in length_buckets([3, 1, 2], 1)] == [[0, 1, 2]]
    lengths = [7, 3, 7, 3, 3, 12]
    groups = length_buckets(lengths, 4)
    assert len(groups) == 3 and _computed(lengths, groups) == sum(lengths)
    assert [g.tolist() for g in length_buckets([4, 4, 4], 3)] == [[0, 1, 2]]  # equal lengths: one forward
    assert length_buckets([], 3) == []


@pytest.mark.parametrize("seed", range(20))
def test_split_is_optimal_and_a_partition(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=int(rng.integers(1, 14))).tolist()
    k = int(rng.integers(1, 5))
    groups = length_buckets(lengths, k)
    assert 1 <= len(groups) <= k
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    assert all(np.all(np.diff(g) > 0) for g in groups)  # input order inside a group
    assert _computed(lengths, groups) == _brute_force(lengths, k)


def test_bad_bound():
    with pytest.raises(ValueError, match="max_buckets must be >= 1"):
        length_buckets([1, 2], 0)
    with pytest.raises(ValueError, match="'length_buckets' must be positive"):
        EncoderConfig(vlm_name_or_path="tiny-qwen2-vl", length_buckets=0)


def test_visual_token_index():
    # rows with 2, 0, 1 images of 3 tokens: tokens 0-5, -, 6-8
    assert visual_token_index([2, 0, 1], np.array([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2, 3, 4, 5]
    assert visual_token_index([2, 0, 1], np.array([1]), 3).tolist() == []


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        paths.append(str(d / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _encoder(name, size, tmp_path, buckets, **kw):
    torch.manual_seed(0)
    cfg = dict(vlm_name_or_path=name, vlm_dtype="fp32", image_size=size, finetune="lora", lora_dropout=0.0,
               vision_cache_dtype="fp32", max_text_tokens=16, length_buckets=buckets, gradient_checkpointing=False)
    cfg.update(kw)
    return VLMEncoder(EncoderConfig(**cfg), cache_dir=str(tmp_path)).train()


def _histories(images):
    texts = [["a red lipstick", "b", "c", "a long title about a blue running shoe with mesh"], ["d"],
             ["e", "f"], ["g", "h", "i"], ["j"]]
    imgs = [[images[0], images[1], None, images[2]], [None], [images[3], images[4]], [images[1], None, images[0]],
            [images[2]]]
    return texts, imgs


def _embed_and_grad(encoder, texts, imgs, interleaved):
    encoder.zero_grad()
    if interleaved:
        out = [encoder.encode_interleaved_users(texts, imgs)]
    else:
        users = encoder.encode_users(texts, imgs)
        out = [users.text, users.image]
    weights = torch.linspace(-1, 1, out[0].shape[1])
    sum(((o * weights).sum(1) ** 2).sum() for o in out).backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads


@pytest.mark.parametrize("name,size", [("tiny-qwen2-vl", 56), ("tiny-qwen3-vl", 64)])  # qwen3: deepstack features
@pytest.mark.parametrize("interleaved", [False, True])
def test_bucketed_embeddings_and_gradients_equal_the_padded_batch(name, size, interleaved, images, tmp_path):
    torch.set_num_threads(1)
    texts, imgs = _histories(images)
    padded = _encoder(name, size, tmp_path / "one", 1)
    bucketed = _encoder(name, size, tmp_path / "four", 4)
    bucketed.load_state_dict(padded.state_dict())
    out_padded, grad_padded = _embed_and_grad(padded, texts, imgs, interleaved)
    out_bucketed, grad_bucketed = _embed_and_grad(bucketed, texts, imgs, interleaved)
    for a, b in zip(out_padded, out_bucketed):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert grad_padded and grad_padded.keys() == grad_bucketed.keys()
    for key in grad_padded:
        torch.testing.assert_close(grad_bucketed[key], grad_padded[key], atol=1e-5, rtol=1e-4)
    # the same real tokens, less computed
    assert bucketed.token_stats["real"] == padded.token_stats["real"]
    assert padded.token_stats["computed"] > bucketed.token_stats["computed"] >= bucketed.token_stats["real"]
