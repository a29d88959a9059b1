"""PETRA's pieces (revbits.petra.pieces) in one process: BDIA pieces invert bit for bit, a GPT cut into pieces
computes the GPT, and every piece draws its random numbers from its own stream."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import relative_error
from revbits.bdia.fixedpoint import quantize
from revbits.models import GPT, GPTConfig, TransformerBlock, create
from revbits.petra import bdia_pieces, gpt_pieces, vit_pieces
from revbits.rng import derive_seed

pytestmark = pytest.mark.usefixtures("one_thread")


def token_batch(batch: int = 3, length: int = 12, vocab: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    row = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(3))
    return row[:, :-1], row[:, 1:]


def test_bdia_pieces_invert_bit_for_bit_with_dropout():
    torch.manual_seed(0)
    pieces, _ = bdia_pieces([TransformerBlock(16, 2, causal=True, dropout=0.1) for _ in range(4)])
    x = torch.randn(3, 12, 16)
    states = [x]
    with torch.no_grad():
        for piece in pieces:
            states.append(piece(states[-1], 7))
        y = states[-1]
        for k in range(len(pieces) - 1, 0, -1):
            y = pieces[k].inverse(y, 7)
            assert torch.equal(y, states[k]), k
        assert torch.equal(pieces[0].inverse(y, 7), quantize(x, 9))
    assert all(not piece.in_flight for piece in pieces[1:])  # the residue bits were used up


def tiny_gpt(memory: str = "bdia", dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=12, n_layer=4, n_head=2, d_model=16, dropout=dropout, memory=memory))


def test_gpt_pieces_compute_what_the_gpt_computes():
    """The PETRA GPT is revbits.models.GPT cut into pieces: the same loss bit for bit (with the pieces' signs of
    gamma given to the GPT's BDIAStack), the GPT's own modules, and the gradients of the tied GPT once the
    untied head's gradient is added back to the embedding's."""
    tokens, targets = token_batch()
    gpt = tiny_gpt()
    tied = copy.deepcopy(gpt)
    pieces = gpt_pieces(gpt, seed=5, untie=True)
    stem, entry, steps, exit_piece, head = pieces[0], pieces[1], pieces[2:-2], pieces[-2], pieces[-1]
    assert stem.module.token_embedding is gpt.token_embedding and head.ln_f is gpt.ln_f and head.head is gpt.head
    assert [s.block for s in [entry, *steps]] == list(gpt.stack.blocks)
    assert gpt.head.weight is not gpt.token_embedding.weight and torch.equal(gpt.head.weight, tied.head.weight)

    x = stem(tokens, 7)
    for piece in [entry, *steps, exit_piece]:
        x = piece(x, 7)
    loss = head(x, targets)
    signs = torch.stack([(s.gamma_of(7, x) / s.gamma).flatten() for s in steps])
    forward = tied.stack.forward
    tied.stack.forward = lambda stream: forward(stream, gammas=signs)
    want = tied(tokens, targets).loss
    assert torch.equal(loss, want)

    loss.backward()
    want.backward()
    got = dict(gpt.named_parameters(remove_duplicate=False))
    for name, p in tied.named_parameters():
        g = got[name].grad
        if name == "token_embedding.weight":  # the two uses of the tied matrix, one in each end stage
            g = g + gpt.head.weight.grad
        assert relative_error(g, p.grad) <= 1e-5, name


def test_gpt_pieces_refuse_what_petra_cannot_train():
    with pytest.raises(ValueError, match="ties its output projection to its token embedding.*untie=True"):
        gpt_pieces(tiny_gpt())
    needs_bdia = r"PETRA needs the GPT's blocks in a BDIAStack \(memory='bdia'\), got SequentialStack"
    with pytest.raises(ValueError, match=needs_bdia):
        gpt_pieces(tiny_gpt("standard"), untie=True)
    with pytest.raises(ValueError, match="without its stack's recompute context .*build the GPT with memory='bdia'"):
        gpt_pieces(tiny_gpt("bdia+mesa"), untie=True)



def first_masks(pieces: list, x: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
    """The first dropout mask each piece's module (the stem, then each BDIA block) would draw for ``micro_batch``:
    256 elements at p = 0.5 from the RNG state the module starts from, drawn under fork_rng so the run is untouched."""
    masks = []

    def draw(module, args):
        with torch.random.fork_rng():
            masks.append(F.dropout(torch.ones(256), 0.5) == 0)

    modules = [pieces[0].module] + [piece.block for piece in pieces[1:]]
    handles = [module.register_forward_pre_hook(draw) for module in modules]
    with torch.no_grad():
        for piece in pieces:
            x = piece(x, micro_batch)
    for handle in handles:
        handle.remove()
    return masks


def cut(kind: str, seed: int) -> tuple[list, torch.Tensor]:
    """The stem and BDIA pieces (entry, steps) of a tiny model with dropout, and an input for them."""
    torch.manual_seed(0)
    if kind == "gpt":
        return gpt_pieces(tiny_gpt(dropout=0.5), seed, untie=True)[:-2], token_batch()[0]
    vit = create("vit", memory="bdia", dropout=0.5, image_size=8, patch_size=4, n_layer=3, n_head=2, d_model=16)
    return vit_pieces(vit, seed)[:-2], torch.rand(2, 1, 8, 8)


@pytest.mark.parametrize("kind", ["gpt", "vit"])
def test_stem_and_every_block_draw_dropout_from_their_own_streams(kind):
    """Before 0.3 the stem and block 0 were both seeded with derive_seed(seed, m): the same masks. Now every piece
    has its own stream, none of them derive_seed(seed, m) itself (the training command's data order), and each
    is a function of (seed, micro-batch), so the backward's recompute draws the forward's masks."""
    pieces, x = cut(kind, seed=5)
    masks = first_masks(pieces, x, 7)
    assert len(masks) == len(pieces) >= 3
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(5, 7))
        data_order = F.dropout(torch.ones(256), 0.5) == 0
    for (i, a), (j, b) in itertools.combinations(enumerate([*masks, data_order]), 2):
        assert not torch.equal(a, b), (i, j)
    assert all(torch.equal(a, b) for a, b in zip(masks, first_masks(pieces, x, 7)))
    assert not torch.equal(masks[0], first_masks(pieces, x, 8)[0])
