"""Helper functions shared by the test modules (``from helpers import ...``)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

from revbits.models import TransformerBlock

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str, monkeypatch) -> ModuleType:
    """The module benchmarks/<name>.py, imported with benchmarks/ on sys.path for the test (as the scripts import
    their siblings)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


def gpt_blocks(depth: int, d_model: int = 32, n_heads: int = 4, dropout: float = 0.0, **kw) -> list:
    """``depth`` small causal pre-LN blocks."""
    return [TransformerBlock(d_model, n_heads, dropout=dropout, causal=True, **kw) for _ in range(depth)]


def random_signs(depth: int, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 2, (depth - 1, batch), generator=generator) * 2 - 1


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def reversible_and_plain_agree_under_autocast(stack, x, signs, device_type: str, autocast: bool) -> None:
    """Run the same forward reversibly and under plain autograd, inside bf16 autocast (or not), and
    check that the stream stays fp32, the outputs are equal bitwise and the gradients to 1e-5."""
    results = []
    for reversible in (True, False):
        stack.reversible = reversible
        for t in [x, *stack.parameters()]:
            t.grad = None
        torch.manual_seed(1)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            out = stack(x, gammas=signs)
        assert out.dtype == torch.float32
        out.square().mean().backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in stack.parameters()]))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert torch.equal(out_a, out_b)
    assert relative_error(gx_a, gx_b) <= 1e-5
    assert max(relative_error(a, b) for a, b in zip(gp_a, gp_b)) <= 1e-5


#: The sizes of the tests' tiny decoders: 3 layers, d 32, 4 heads, 2 key/value heads, vocabulary 64.
TINY_DECODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def tiny_decoder_config(config_class, **overrides):
    """``config_class`` (a transformers config class) at the :data:`TINY_DECODER` sizes, with ``overrides``."""
    return config_class(**(TINY_DECODER | overrides))


def tiny_llama_config(**overrides):
    """A 3-layer Llama config (d 32, 4 heads, 2 key/value heads) for fast tests."""
    from transformers import LlamaConfig

    return tiny_decoder_config(LlamaConfig, **overrides)


def run_step(stack, x, args=(), signs=None, seed: int = 0):
    """One forward and backward of ``stack`` from RNG seed ``seed`` with a fixed, uneven output
    weighting: (output, gradients of x, the arguments that require grad and the parameters)."""
    for t in [x, *args, *stack.parameters()]:
        t.grad = None
    torch.manual_seed(seed)
    out = stack(x, *args, gammas=signs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = {"x": x.grad.clone()}
    grads.update({f"arg{i}": a.grad.clone() for i, a in enumerate(args) if a.requires_grad})
    grads.update({n: p.grad.clone() for n, p in stack.named_parameters() if p.requires_grad})
    return out.detach(), grads


#: Relative gradient error allowed between a reversible BDIA step and plain autograd on the same forward.
BDIA_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def reversible_against_plain(stack, x, args=(), signs=None, dtype=torch.float64):
    """One step of ``stack`` reversible and with ``reversible=False`` (the same chunks and slices): the outputs
    bitwise equal, the same gradients, each within :data:`BDIA_TOLERANCE` of plain autograd's."""
    stack.reversible = True
    out_rev, grads_rev = run_step(stack, x, args, signs)
    stack.reversible = False
    out_ref, grads_ref = run_step(stack, x, args, signs)
    stack.reversible = True
    assert torch.equal(out_rev, out_ref)
    assert grads_rev.keys() == grads_ref.keys()
    worst = {name: relative_error(grads_rev[name], grads_ref[name]) for name in grads_ref}
    assert max(worst.values()) <= BDIA_TOLERANCE[dtype], worst
    return out_rev, grads_rev


def converted_steps(model, ids) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """One training step of a converted causal LM (``revbits.hf``) on ``ids``, reversible and then plain
    (the same forward under plain autograd), from the same RNG seed: [(loss, {name: grad of each trainable
    parameter})] for each."""
    from revbits import hf

    results = []
    for reversible in (True, False):
        hf.revbits_stack(model).reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return results
