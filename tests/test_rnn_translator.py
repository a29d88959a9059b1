"""The attention RNN translator: reversible gradients equal the reference, memory, greedy decoding."""

from __future__ import annotations

import pytest
import torch

from helpers import relative_error
from revbits.measure import measure_training_step
from revbits.models import RNNTranslator, RNNTranslatorConfig


def make_model(memory: str, cell: str = "gru", **options) -> RNNTranslator:
    torch.manual_seed(0)
    options = {"d_model": 16, "attention_slice": 4, **options}
    config = RNNTranslatorConfig(src_vocab=30, tgt_vocab=25, cell=cell, memory=memory, **options)
    return RNNTranslator(config)


def batch(rows: int = 4, src_len: int = 9, tgt_len: int = 7) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(3, 30, (rows, src_len), generator=generator)
    tgt = torch.randint(3, 25, (rows, tgt_len + 1), generator=generator)
    src[1, 5:] = 0  # padding
    src[2, 2:] = 0
    tgt[1, 4:] = 0
    return src, tgt[:, :-1], tgt[:, 1:]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_reversible_translator_gradients_equal_the_reference_forward(cell):
    model = make_model("reversible", cell, n_layer=2, attention_slice=4, dropout=0.3)
    model.train()
    results = []
    for reversible in (True, False):
        model.encoder.reversible = model.decoder.reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks in both runs
        src, tgt_in, targets = batch()
        losses = model.token_losses(src, tgt_in, targets)
        (losses.sum() / (targets != 0).sum()).backward()
        results.append((losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (losses_a, grads_a), (losses_b, grads_b) = results
    assert torch.equal(losses_a, losses_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert relative_error(grads_a[name], grads_b[name]) <= 1e-5, name
    assert grads_a["encoder.cells.0.gates.0.weight"].abs().sum() > 0  # the decoder's gradient reached the encoder


def test_padding_does_not_change_a_sentence_loss():
    model = make_model("reversible").eval()
    src, tgt_in, tgt_out = batch()
    with torch.no_grad():
        losses = model.token_losses(src, tgt_in, tgt_out)
        wider = torch.cat([src, torch.zeros(4, 3, dtype=torch.long)], 1)
        losses_wider = model.token_losses(wider, tgt_in, tgt_out)
    assert torch.equal(losses, losses_wider)


def test_reversible_translator_holds_a_fraction_of_the_standard_activations():
    held = {}
    data = batch(rows=16, src_len=40, tgt_len=40)
    for memory in ("standard", "reversible"):
        model = make_model(memory, d_model=128, attention_slice=8, dropout=0.0).train()
        report = measure_training_step(model, lambda m=model: m(*data[:2], targets=data[2]).loss)
        held[memory] = report.held_after_forward
    assert held["reversible"] < 0.5 * held["standard"], held


def test_greedy_decoding_stops_at_eos_and_slices_are_checked():
    model = make_model("reversible").eval()
    src, _, _ = batch()
    out = model.greedy(src, max_len=5)
    assert len(out) == 4 and all(len(row) <= 5 and 2 not in row for row in out)
    with pytest.raises(ValueError, match="attention_slice"):
        make_model("reversible", attention_slice=17)
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(4, 3, dtype=torch.long), *batch()[1:])
