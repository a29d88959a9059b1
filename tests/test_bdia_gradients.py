"""BDIAStack's reversible backward gives the gradients of plain autograd on the same forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import revbits
from helpers import gpt_blocks, random_signs, relative_error, reversible_and_plain_agree_under_autocast, run_step
from revbits.bdia import RecomputationError
from revbits.models import TransformerBlock

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def compare_with_plain(stack, x, args=(), signs=None, seed=0, dtype=torch.float64):
    stack.reversible = True
    out_rev, grads_rev = run_step(stack, x, args, signs, seed)
    stack.reversible = False
    out_ref, grads_ref = run_step(stack, x, args, signs, seed)
    stack.reversible = True
    assert torch.equal(out_rev, out_ref), "the reversible forward must equal the plain forward bitwise"
    assert grads_rev.keys() == grads_ref.keys()
    worst = {name: relative_error(grads_rev[name], grads_ref[name]) for name in grads_ref}
    assert max(worst.values()) <= TOLERANCE[dtype], worst
    return grads_rev


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deep_stack_with_dropout_matches_plain_autograd(dtype):
    torch.manual_seed(0)
    depth, batch = 48, 2
    stack = revbits.BDIAStack(gpt_blocks(depth, d_model=16, n_heads=2, dropout=0.1)).to(dtype)
    x = torch.randn(batch, 6, 16, dtype=dtype, requires_grad=True)
    compare_with_plain(stack, x, signs=random_signs(depth, batch), dtype=dtype)


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
def test_batch_sizes_match_plain_autograd(batch):
    torch.manual_seed(batch)
    stack = revbits.BDIAStack(gpt_blocks(6, dropout=0.1)).double()
    x = torch.randn(batch, 5, 32, dtype=torch.float64, requires_grad=True)
    compare_with_plain(stack, x, signs=random_signs(6, batch))


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_attention_memory_gets_exact_gradients(dtype, keep):
    torch.manual_seed(1)
    depth, batch = 8, 3
    stack = revbits.BDIAStack(gpt_blocks(depth, dropout=0.1, cross_attention=True), keep_last_graph=keep).to(dtype)
    x = torch.randn(batch, 7, 32, dtype=dtype, requires_grad=True)
    memory = torch.randn(batch, 4, 32, dtype=dtype, requires_grad=True)
    grads = compare_with_plain(stack, x, (memory,), random_signs(depth, batch), dtype=dtype)
    assert grads["arg0"].abs().sum() > 0, "the encoder output must receive a gradient"


def test_attention_mask_argument_without_gradient():
    torch.manual_seed(2)
    stack = revbits.BDIAStack(gpt_blocks(4)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    compare_with_plain(stack, x, (mask,), random_signs(4, 2))


def test_quarter_gamma_stores_two_bits_and_stays_exact():
    torch.manual_seed(3)
    stack = revbits.BDIAStack(gpt_blocks(6, dropout=0.1), gamma=0.25, check=True).double()
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    compare_with_plain(stack, x, signs=random_signs(6, 3))


def test_shared_and_frozen_parameters():
    torch.manual_seed(4)
    blocks = gpt_blocks(5)
    blocks[3] = blocks[1]  # the same module twice: its parameters are used by two blocks
    for p in blocks[0].mlp.parameters():
        p.requires_grad_(False)
    stack = revbits.BDIAStack(blocks).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    grads = compare_with_plain(stack, x, signs=random_signs(5, 2))
    assert not any(name.startswith("blocks.0.mlp") for name in grads)


def test_random_gammas_in_training_mode_are_reproducible_from_the_seed():
    torch.manual_seed(5)
    stack = revbits.BDIAStack(gpt_blocks(4)).double().train()
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(stack(x))
    torch.manual_seed(12)
    other = stack(x)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], other)


@pytest.mark.parametrize(
    "batch, chunks, check, dropout",
    [(2, "auto", False, 0.2), (6, 3, True, 0.3)],  # whole batch; dropout replayed per chunk, rebuilt states checked
)
def test_backward_leaves_the_global_rng_as_plain_autograd_does(batch, chunks, check, dropout):
    torch.manual_seed(6)
    stack = revbits.BDIAStack(gpt_blocks(4, dropout=dropout), check=check, batch_chunks=chunks).double()
    x = torch.randn(batch, 5, 32, dtype=torch.float64, requires_grad=True)
    after = []
    for reversible in (True, False):
        stack.reversible = reversible
        torch.manual_seed(0)
        stack(x).sum().backward()
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


def test_bf16_autocast_inside_blocks_keeps_fp32_stream_exact():
    torch.manual_seed(7)
    depth = 6
    stack = revbits.BDIAStack(gpt_blocks(depth, dropout=0.1), check=True)
    x = torch.randn(2, 8, 32, requires_grad=True)
    reversible_and_plain_agree_under_autocast(stack, x, random_signs(depth, 2), "cpu", autocast=True)


def test_gradient_flows_to_the_input_through_the_straight_through_quantiser():
    torch.manual_seed(8)
    stack = revbits.BDIAStack(gpt_blocks(3)).double()
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    grads = compare_with_plain(stack, x, signs=random_signs(3, 2))
    assert grads["x"].abs().sum() > 0


def test_parameters_frozen_between_forward_and_backward_keep_their_slots():
    torch.manual_seed(9)
    stack = revbits.BDIAStack(gpt_blocks(4)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(4, 2)
    torch.manual_seed(0)
    stack(x, gammas=signs).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in stack.named_parameters()}
    stack.zero_grad()
    torch.manual_seed(0)
    out = stack(x, gammas=signs).square().sum()
    first = next(stack.blocks[1].parameters())
    first.requires_grad_(False)  # frozen after the forward pass
    out.backward()
    assert first.grad is None, "a parameter frozen before backward gets no gradient"
    for name, p in stack.named_parameters():
        if p is not first:
            assert torch.allclose(p.grad, expected[name], rtol=1e-12, atol=0), name


# -- autograd.grad and backward(inputs=) touch what plain autograd touches -----------------------------------


class HeldTableBlock(torch.nn.Module):
    """A block that uses a tensor it holds by reference, not as a parameter: as an attribute, in a list, or
    in a closure (which the stack cannot see, so the engine rules of the backward apply to it)."""

    def __init__(self, table: torch.Tensor, holder: str) -> None:
        super().__init__()
        self.body = TransformerBlock(16, 2)
        if holder == "attribute":
            self.table = table
        elif holder == "list":
            self.tables = [table]
        else:
            self.get_table = lambda: table

    def forward(self, x):
        if hasattr(self, "get_table"):
            table = self.get_table()
        else:
            table = self.tables[0] if hasattr(self, "tables") else self.table
        return self.body(x) + 0.25 * torch.tanh(x) * table


class Model(torch.nn.Module):
    def __init__(self, blocks) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.stack = revbits.BDIAStack(blocks, batch_chunks=2)
        self.head = torch.nn.Linear(16, 1)

    def loss(self, emb, signs):
        return self.head(self.stack(emb, gammas=signs)).square().mean()


def held_table_model(holder: str):
    torch.manual_seed(10)
    table = torch.randn(16, dtype=torch.float64, requires_grad=True)
    model = Model([HeldTableBlock(table, holder) for _ in range(4)]).double()
    return model, {**dict(model.named_parameters()), "table": table}


def fgsm_step(model, tensors, how: str):
    """FGSM on the embeddings (their gradient by autograd.grad or backward(inputs=)), then the training
    backward: (names of the tensors the first backward gave a .grad, gradients after the second)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 8, dtype=torch.float64, generator=g)
    signs = random_signs(4, 4, g)
    emb = model.embed(x)
    loss = model.loss(emb, signs)
    if how == "grad":
        (grad,) = torch.autograd.grad(loss, emb)
    else:
        loss.backward(inputs=[emb])
        grad = emb.grad
    touched = sorted(n for n, t in tensors.items() if t.grad is not None)
    model.loss(model.embed(x) + 0.05 * grad.sign(), signs).backward()
    return touched, {n: t.grad.clone() for n, t in tensors.items()}


@pytest.mark.parametrize("how", ["grad", "inputs"])
@pytest.mark.parametrize("holder", ["attribute", "list", "closure"])
@pytest.mark.filterwarnings("ignore:block 3 \\(HeldTableBlock\\) uses a tensor")
def test_fgsm_touches_what_plain_autograd_touches(how, holder):
    results = []
    for reversible in (True, False):
        model, tensors = held_table_model(holder)
        model.stack.reversible = reversible
        results.append(fgsm_step(model, tensors, how))
    (touched, grads), (touched_ref, grads_ref) = results
    assert touched_ref == [] and touched == [], "the embeddings' gradient alone must leave every .grad None"
    worst = {n: relative_error(grads[n], grads_ref[n]) for n in grads_ref}
    assert max(worst.values()) <= 1e-9, worst


def test_gradient_of_a_held_tensor_by_autograd_grad_and_backward_inputs():
    """A tensor a block holds as an attribute is an input of the reversible Function like a parameter."""
    results = []
    for reversible in (True, False):
        model, tensors = held_table_model("attribute")
        model.stack.reversible = reversible
        x = torch.randn(4, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        signs = random_signs(4, 4, torch.Generator().manual_seed(5))
        (by_grad,) = torch.autograd.grad(model.loss(model.embed(x), signs), tensors["table"])
        model.loss(model.embed(x), signs).backward(inputs=[tensors["table"]])
        touched = sorted(n for n, t in tensors.items() if t.grad is not None)
        results.append((by_grad, tensors["table"].grad, touched))
    (by_grad, by_inputs, touched), (ref_grad, ref_inputs, ref_touched) = results
    assert touched == ref_touched == ["table"]
    assert relative_error(by_grad, ref_grad) <= 1e-9 and relative_error(by_inputs, ref_inputs) <= 1e-9


def test_autograd_grad_of_parameters_and_backward_inputs_of_some_parameters():
    results = []
    for reversible in (True, False):
        model, tensors = held_table_model("list")
        model.stack.reversible = reversible
        x = torch.randn(4, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        signs = random_signs(4, 4, torch.Generator().manual_seed(9))
        block = dict(model.stack.blocks[1].named_parameters())
        wanted = [block["body.attn.query.weight"], block["body.mlp.fc.bias"], model.embed.weight]
        by_grad = torch.autograd.grad(model.loss(model.embed(x), signs), wanted)
        touched_by_grad = sorted(n for n, t in tensors.items() if t.grad is not None)
        model.loss(model.embed(x), signs).backward(inputs=wanted[:2])
        touched = sorted(n for n, t in tensors.items() if t.grad is not None)
        results.append((by_grad, [t.grad for t in wanted[:2]], touched_by_grad, touched))
    (by_grad, by_inputs, none, touched), (ref_grad, ref_inputs, ref_none, ref_touched) = results
    assert none == ref_none == []
    assert touched == ref_touched == ["stack.blocks.1.body.attn.query.weight", "stack.blocks.1.body.mlp.fc.bias"]
    assert max(relative_error(a, b) for a, b in zip([*by_grad, *by_inputs], [*ref_grad, *ref_inputs])) <= 1e-9


def test_a_tensor_in_a_closure_gets_its_gradient_from_backward_with_a_warning():
    results = []
    for reversible in (True, False):
        model, tensors = held_table_model("closure")
        model.stack.reversible = reversible
        x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
        loss = model.loss(model.embed(x), random_signs(4, 2, torch.Generator().manual_seed(13)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss.backward()
        results.append((tensors["table"].grad, [str(w.message) for w in caught if "HeldTableBlock" in str(w.message)]))
    (grad, messages), (ref, ref_messages) = results
    assert relative_error(grad, ref) <= 1e-9
    assert ref_messages == [] and len(messages) == 1
    assert messages[0].startswith("block 3 (HeldTableBlock) uses a tensor of shape [16] requiring grad")


def test_autograd_grad_of_a_tensor_in_a_closure_and_used_outside_raises():
    """The engine will not say whether autograd.grad wants a leaf's gradient that the stack cannot return;
    the backward raises instead of leaving out the blocks' share."""
    model, tensors = held_table_model("closure")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    emb = model.embed(x)
    loss = model.loss(emb, random_signs(4, 2)) + tensors["table"].sum()
    with pytest.raises(RecomputationError, match=r"autograd.grad asks for .* shape \[16\] that block 3"):
        torch.autograd.grad(loss, [emb, tensors["table"]])


@pytest.mark.filterwarnings("ignore:block 2 \\(HeldTableBlock\\) uses a tensor")
def test_a_non_leaf_tensor_in_closures_of_two_blocks_is_named():
    model, tensors = held_table_model("attribute")
    model.stack.batch_chunks = 1  # with chunks, the second chunk of block 2 would be the second walk
    shared = tensors["table"] * 2
    for k in (1, 2):
        del model.stack.blocks[k].table
        model.stack.blocks[k].get_table = lambda: shared
    loss = model.loss(model.embed(torch.randn(2, 5, 8, dtype=torch.float64)), random_signs(4, 2))
    with pytest.raises(RecomputationError, match=r"block 1 \(HeldTableBlock\) and blocks 2 use a tensor computed"):
        loss.backward()


def test_a_non_leaf_tensor_shared_by_blocks_gets_its_gradient_once():
    """A tensor computed with a graph and held by two blocks (in 2 batch chunks each): its graph is walked
    once, by the engine, with the summed gradient, as under plain autograd."""
    results = []
    for reversible in (True, False):
        model, tensors = held_table_model("attribute")
        base = tensors.pop("table")
        shared = base * 2  # not a leaf
        for block in model.stack.blocks[1:3]:
            block.table = shared
        for block in (model.stack.blocks[0], model.stack.blocks[3]):
            block.table = base
        model.stack.reversible = reversible
        x = torch.randn(4, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        loss = model.loss(model.embed(x), random_signs(4, 4, torch.Generator().manual_seed(7)))
        (by_grad,) = torch.autograd.grad(loss, shared, retain_graph=False)
        model.loss(model.embed(x), random_signs(4, 4, torch.Generator().manual_seed(7))).backward()
        results.append((by_grad, base.grad.clone(), {n: t.grad.clone() for n, t in tensors.items()}))
    (by_grad, base_grad, grads), (ref_by_grad, ref_base, ref_grads) = results
    assert relative_error(by_grad, ref_by_grad) <= 1e-9
    assert relative_error(base_grad, ref_base) <= 1e-9
    assert max(relative_error(grads[n], ref_grads[n]) for n in ref_grads) <= 1e-9


def test_a_parameter_replaced_between_forward_and_backward_is_named():
    model, _ = held_table_model("attribute")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    loss = model.loss(model.embed(x), random_signs(4, 2))
    linear = model.stack.blocks[2].body.mlp.fc
    linear.weight = torch.nn.Parameter(linear.weight.detach().clone())
    with pytest.raises(RecomputationError, match=r"block 2 \(HeldTableBlock\): parameter 'body.mlp.fc.weight'"):
        loss.backward()


@pytest.mark.parametrize("memory", revbits.MEMORY_MODES)
def test_an_empty_batch_gives_an_empty_output_and_gradient_in_every_mode(memory):
    torch.manual_seed(11)
    blocks = gpt_blocks(3, d_model=16, n_heads=2)
    reference = revbits.stack([copy.deepcopy(b) for b in blocks], memory="standard").double()
    stack = revbits.stack(blocks, memory=memory).double()
    results = []
    for s in (stack, reference):
        x = torch.randn(0, 5, 16, dtype=torch.float64, requires_grad=True)
        out = s(x)
        out.sum().backward()
        results.append((out, x.grad, [p.grad for p in s.parameters()]))
        s.eval()
        with torch.no_grad():
            assert s(x).shape == x.shape
    (out, grad, params), (_, _, ref_params) = results
    assert out.shape == (0, 5, 16) and grad is not None and grad.shape == (0, 5, 16)
    for p, ref in zip(params, ref_params):
        assert (p is None and ref is None) or torch.equal(p, ref)
