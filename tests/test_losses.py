"""revbits.losses.linear_cross_entropy: the loss and every gradient equal plain autograd on the full
logits (F.cross_entropy), in float64 to 1e-12 and float32 to 1e-6, for every option; its peak memory
is a small fraction of the plain path's at a large vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from helpers import relative_error
from revbits.losses import linear_cross_entropy
from revbits.measure import LiveBytes

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
VOCAB, D = 37, 8


def plain_loss(hidden, head, labels, *, ignore_index=-100, shift=False, softcap=None, z_loss=0.0, reduction="mean",
               num_items_in_batch=None):
    """The reference: the full logits, then F.cross_entropy (as transformers computes a causal LM's loss)."""
    logits = head(hidden)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat, targets = logits.flatten(0, -2), labels.flatten()
    per_token = F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="none")
    per_token = per_token + z_loss * torch.logsumexp(flat, -1).square() * (targets != ignore_index)
    if reduction == "none":
        return per_token.view(labels.shape)
    if reduction == "sum":
        return per_token.sum()
    count = (targets != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() / count


def data(dtype, batch=3, length=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, D, generator=g, dtype=dtype)
    labels = torch.randint(VOCAB, (batch, length), generator=g)
    labels[0, :4] = -100  # a padded row
    labels[2, 7] = -100
    return hidden, labels


def gradients(loss_fn, hidden, params):
    """(loss, d loss / d hidden, d loss / d params) of loss_fn(hidden) by autograd."""
    leaf = hidden.clone().requires_grad_()
    loss = loss_fn(leaf)
    weights = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((loss * weights).sum(), [leaf, *params])
    return loss.detach(), grads


def assert_same(fused, plain, tolerance):
    (loss_f, grads_f), (loss_p, grads_p) = fused, plain
    assert relative_error(loss_f, loss_p) <= tolerance
    assert all(relative_error(a, b) <= tolerance for a, b in zip(grads_f, grads_p))
    assert all(b.abs().max() > 0 for b in grads_p), "every gradient is non-trivial"


OPTIONS = [
    {},
    {"shift": True},
    {"softcap": 3.0},
    {"z_loss": 1e-2},
    {"reduction": "sum"},
    {"reduction": "none", "shift": True, "softcap": 2.0, "z_loss": 0.1},
    {"num_items_in_batch": 50},
    {"num_items_in_batch": torch.tensor(41), "shift": True},
    {"ignore_index": 3},
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_loss_and_gradients_equal_the_plain_loss(dtype, options):
    torch.manual_seed(0)
    head = nn.Linear(D, VOCAB, bias=True).to(dtype)
    hidden, labels = data(dtype)
    labels = labels.masked_fill(labels == -100, options.get("ignore_index", -100))
    params = list(head.parameters())
    fused = gradients(lambda h: linear_cross_entropy(h, head, labels, chunk_tokens=4, **options), hidden, params)
    plain = gradients(lambda h: plain_loss(h, head, labels, **options), hidden, params)
    assert_same(fused, plain, TOLERANCE[dtype])


@pytest.mark.parametrize("chunk_tokens", [1, 5, 33, 1000, None])
def test_every_chunk_size_gives_the_same_loss(chunk_tokens):
    head = nn.Linear(D, VOCAB, bias=False).double()
    hidden, labels = data(torch.float64)
    fused = gradients(lambda h: linear_cross_entropy(h, head, labels, chunk_tokens=chunk_tokens), hidden, [head.weight])
    plain = gradients(lambda h: plain_loss(h, head, labels), hidden, [head.weight])
    assert_same(fused, plain, 1e-12)


def test_a_weight_tensor_or_an_embedding_serves_as_the_head():
    embedding = nn.Embedding(VOCAB, D).double()
    hidden, labels = data(torch.float64)
    plain = gradients(lambda h: plain_loss(h, lambda x: x @ embedding.weight.T, labels), hidden, [embedding.weight])
    for head in (embedding.weight, embedding):
        fused = gradients(lambda h, head=head: linear_cross_entropy(h, head, labels, chunk_tokens=7), hidden,
                          [embedding.weight])
        assert_same(fused, plain, 1e-12)


def test_a_head_tied_to_the_embedding_gets_both_gradients():
    """The tied weight's gradient sums the embedding's and the head's contributions."""
    torch.manual_seed(0)
    embedding, mix = nn.Embedding(VOCAB, D).double(), nn.Linear(D, D).double()
    head = nn.Linear(D, VOCAB, bias=False).double()
    head.weight = embedding.weight
    ids = torch.randint(VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    params = [embedding.weight, *mix.parameters()]

    def run(loss_fn):
        hidden = torch.tanh(mix(embedding(ids)))
        loss = loss_fn(hidden, head, ids, shift=True)
        return loss.detach(), torch.autograd.grad(loss, params)

    fused = run(lambda *a, **k: linear_cross_entropy(*a, chunk_tokens=4, **k))
    plain = run(plain_loss)
    assert_same((fused[0], fused[1]), (plain[0], plain[1]), 1e-12)


def test_lora_on_the_head_gets_the_plain_gradients():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(D, VOCAB, bias=False)

    torch.manual_seed(0)
    model = get_peft_model(Tiny().double(), LoraConfig(target_modules=["head"], r=4, init_lora_weights=False))
    head = model.base_model.model.head
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(adapters) == 2 and all(p.requires_grad for p in adapters)
    hidden, labels = data(torch.float64)
    fused = gradients(lambda h: linear_cross_entropy(h, head, labels, chunk_tokens=6, shift=True), hidden, adapters)
    plain = gradients(lambda h: plain_loss(h, head, labels, shift=True), hidden, adapters)
    assert_same(fused, plain, 1e-12)


def test_half_precision_logits_are_upcast_per_chunk():
    """A bfloat16 head: each chunk's logits go to float32 before the loss, as transformers upcasts."""
    head = nn.Linear(D, VOCAB, bias=False).bfloat16()
    hidden, labels = data(torch.bfloat16)
    fused = linear_cross_entropy(hidden, head, labels, chunk_tokens=8)
    plain = F.cross_entropy(head(hidden).float().flatten(0, 1), labels.flatten())
    assert fused.dtype == torch.float32
    assert relative_error(fused, plain) <= 1e-6


def test_without_gradients_it_runs_the_chunks_plainly():
    head = nn.Linear(D, VOCAB).double()
    hidden, labels = data(torch.float64)
    with torch.no_grad():
        fused = linear_cross_entropy(hidden, head, labels, chunk_tokens=4, softcap=5.0)
        plain = plain_loss(hidden, head, labels, softcap=5.0)
    assert relative_error(fused, plain) <= 1e-12 and not fused.requires_grad


def test_wrong_arguments_raise():
    head = nn.Linear(D, VOCAB)
    hidden, labels = data(torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(hidden, head, labels[:, 1:])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, head, labels, reduction="max")
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(hidden, lambda h: head(h), labels)  # a callable's vocabulary cannot be read
    with pytest.raises(ValueError, match="at least 1"):
        linear_cross_entropy(hidden, head, labels, chunk_tokens=0)


def peak_of_step(loss_fn, hidden: torch.Tensor) -> int:
    """Peak bytes created during forward + backward (the hidden states and the head exist before)."""
    leaf = hidden.clone().requires_grad_()
    tracker = LiveBytes()
    with tracker:
        loss_fn(leaf).backward()
    return tracker.peak_total


def test_peak_memory_is_a_fraction_of_the_plain_path():
    """2048 tokens at a 8192-token vocabulary: the plain path holds the 64 MiB of float32 logits several
    times over (logits, log-softmax, their gradients); the fused one a 64-token chunk's (2 MiB) at a time."""
    vocab, d = 8192, 32
    head = nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(2, 1024, d)
    labels = torch.randint(vocab, (2, 1024), generator=torch.Generator().manual_seed(0))
    logits_bytes = hidden.shape[0] * hidden.shape[1] * vocab * 4
    plain = peak_of_step(lambda h: F.cross_entropy(head(h).flatten(0, 1), labels.flatten()), hidden)
    fused = peak_of_step(lambda h: linear_cross_entropy(h, head, labels, chunk_tokens=64), hidden)
    assert plain >= 2 * logits_bytes
    assert fused <= 0.05 * plain, (fused, plain)


def test_the_gpt_computes_its_loss_by_it():
    """revbits' GPT with targets: the fused loss, no logits, and the loss and gradients of the plain one."""
    from revbits.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, d_model=16, dropout=0.0)).double()
    tokens = torch.randint(50, (3, 13), generator=torch.Generator().manual_seed(1))
    idx, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :5] = -100
    params = list(model.parameters())
    out = model(idx, targets=targets)
    assert out.logits is None
    fused = out.loss.detach(), torch.autograd.grad(out.loss, params)
    logits = model(idx).logits
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert_same(fused, (loss.detach(), torch.autograd.grad(loss, params)), 1e-12)
