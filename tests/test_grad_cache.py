"""GradCache, the chunked contrastive step (recbole_vlm2rec/grad_cache.py): the same loss and gradients as the
unchunked step, on a toy two-tower model and on VLM2Rec with the tiny backbone."""
import pytest
import torch
import torch.nn.functional as F

from helpers import vlm2rec_model_and_batch, write_tiny_multimodal_dataset
from recbole_vlm2rec.grad_cache import GradCache


class Towers(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.users, self.items = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
        self.dropout = torch.nn.Dropout(dropout)

    def user(self, x):
        return F.normalize(self.dropout(self.users(x)), dim=-1)

    def item(self, x):
        return F.normalize(self.dropout(self.items(x)), dim=-1)


def info_nce(users, items, tau=0.1):
    return F.cross_entropy(users @ items.t() / tau, torch.arange(len(users)))


def _plain(model, x, y):
    loss = info_nce(model.user(x), model.item(y))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _chunked(model, x, y, chunk_size, weight=1.0):
    cache = GradCache(chunk_size, model.parameters())
    users = cache.encode(lambda rows: model.user(x[rows]), len(x))
    items = cache.encode(lambda rows: model.item(y[rows]), len(y))
    assert users.requires_grad and users.grad_fn is None  # a leaf: no graph to the towers before backward
    (loss,) = cache.losses(info_nce(users, items))
    assert all(p.grad is None for p in model.parameters())
    (weight * loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])
def test_chunked_step_equals_plain_step(chunk_size):
    x, y = torch.randn(7, 6), torch.randn(7, 6)
    loss, grads = _plain(Towers(), x, y)
    chunked_loss, chunked_grads = _chunked(Towers(), x, y, chunk_size)
    assert torch.allclose(chunked_loss, loss, atol=1e-6)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6), name


def test_a_weight_on_the_loss_weights_the_cached_gradient():
    # RecBole's gradient scaler multiplies the loss before backward: the chunked gradients must follow
    x, y = torch.randn(5, 6), torch.randn(5, 6)
    _, grads = _chunked(Towers(), x, y, 2)
    _, scaled = _chunked(Towers(), x, y, 2, weight=8.0)
    for name, grad in grads.items():
        assert torch.allclose(scaled[name], 8 * grad, atol=1e-5), name


def test_recomputation_draws_the_first_pass_dropout_masks():
    # one chunk draws the masks in the plain step's order; re-encoding with fresh masks would differ
    x, y = torch.randn(6, 6), torch.randn(6, 6)
    torch.manual_seed(1)
    loss, grads = _plain(Towers(dropout=0.5), x, y)
    after_plain = torch.rand(1)
    torch.manual_seed(1)
    chunked_loss, chunked_grads = _chunked(Towers(dropout=0.5), x, y, 6)
    assert torch.allclose(chunked_loss, loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6), name
    # and the random stream after the step continues where the first pass left it
    assert torch.equal(torch.rand(1), after_plain)


def test_bad_chunk_size_is_refused():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="contrastive_chunk_size must be an integer >= 1"):
            GradCache(bad, [])


def _vlm2rec_step(data, **overrides):
    model, batch = vlm2rec_model_and_batch(data, finetune="lora", lora_r=4, lora_dropout=0.0, **overrides)
    model.train()
    losses = model.calculate_loss(batch)
    total = sum(losses) if isinstance(losses, tuple) else losses
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return total.detach(), grads, model


@pytest.mark.parametrize("fusion", ["external", "internal"])
def test_vlm2rec_chunked_step_equals_the_whole_batch(tmp_path, fusion):
    data = tmp_path / "data"
    write_tiny_multimodal_dataset(data)
    loss, grads, plain = _vlm2rec_step(data, fusion=fusion)
    chunked_loss, chunked_grads, chunked = _vlm2rec_step(data, fusion=fusion, contrastive_chunk_size=5)  # 32 rows: 7 chunks
    assert torch.allclose(chunked_loss, loss, atol=1e-5), (chunked_loss, loss)
    assert grads and all("lora" in name for name in grads)
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-5), name
    if fusion == "external":  # the diagnostics see the one first pass, not the recomputation
        assert chunked.diagnostics.summary() == pytest.approx(plain.diagnostics.summary(), rel=1e-5, nan_ok=True)
        assert chunked.encoder.image_stats == plain.encoder.image_stats


def test_run_recbole_with_chunks_trains_the_same_model(tmp_path):
    # through RecBole's trainer: it sums the returned losses and calls backward, which runs the chunks
    from recbole.quick_start import run_recbole

    from helpers import FIXTURES

    data = tmp_path / "data"
    write_tiny_multimodal_dataset(data)
    results = []
    for chunk_size in (None, 8):
        settings = dict(data_path=str(data), epochs=1, finetune="lora", lora_r=4, lora_dropout=0.0,
                        contrastive_chunk_size=chunk_size, checkpoint_dir=str(tmp_path / f"saved{chunk_size}"))
        results.append(run_recbole(model="VLM2Rec", dataset="tiny-mm", config_file_list=[str(FIXTURES / "vlm2rec-tiny.yaml")],
                                   config_dict=settings))
    plain, chunked = results
    assert chunked["best_valid_score"] == pytest.approx(plain["best_valid_score"], abs=1e-6)
    assert dict(chunked["test_result"]) == pytest.approx(dict(plain["test_result"]), abs=1e-6)


def test_frozen_encoders_need_no_recomputation():
    model = Towers()
    model.requires_grad_(False)
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    cache = GradCache(2, model.parameters())
    calls = []
    users = cache.encode(lambda rows: calls.append(rows) or model.user(x[rows]), 4)
    items = cache.encode(lambda rows: model.item(y[rows]), 4)
    (loss,) = cache.losses(info_nce(users, items))
    loss.backward()
    assert len(calls) == 2 and torch.isfinite(loss)  # the first pass's two chunks only
