"""Third-party blocks in a stack: arguments by keyword, torch.nn and timm layers, drop_path, leaves outside the
parameters, and the advice for higher-order gradients. Every gradient is compared with plain autograd."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch
from torch import nn

import revbits
from revbits import BDIAStack
from revbits.models import TransformerBlock
from revbits.modes import MEMORY_MODES

pytestmark = pytest.mark.usefixtures("one_thread")


def max_relative_error(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30))
    return worst


class KeywordBlock(nn.Module):
    """y = x + tanh(W x * scale + shift + bias), with ``bias`` and ``scale`` by keyword; counts its calls."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.calls = 0

    def forward(self, x: torch.Tensor, shift: torch.Tensor, *, scale: float, bias: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + torch.tanh(self.fc(x) * scale + shift + bias)


def keyword_step(memory: str, reversible: bool = True) -> tuple[list[KeywordBlock], list[torch.Tensor | None]]:
    torch.manual_seed(0)
    blocks = [KeywordBlock(8) for _ in range(3)]
    stack = revbits.stack(blocks, memory=memory)
    if hasattr(stack, "reversible"):
        stack.reversible = reversible
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    shift = torch.randn(8, generator=g, requires_grad=True)
    bias = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    signs = torch.tensor([[1, -1, 1, -1], [1, 1, -1, -1]])
    extra = {"gammas": signs} if memory.startswith("bdia") else {}
    stack(x, shift, scale=0.5, bias=bias, **extra).square().sum().backward()
    return blocks, [x.grad, shift.grad, bias.grad, *(p.grad for p in stack.parameters())]


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_keyword_arguments_reach_every_block_and_get_gradients(memory):
    blocks, grads = keyword_step(memory)
    assert all(b.calls >= 1 for b in blocks)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if memory in ("standard", "checkpoint"):
        assert max_relative_error(grads, keyword_step("standard")[1]) <= 1e-6
    if memory == "bdia":  # reversible against plain autograd on the same quantised forward
        assert max_relative_error(grads, keyword_step("bdia", reversible=False)[1]) <= 1e-5


def encoder_step(reversible: bool) -> list[torch.Tensor | None]:
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True) for _ in range(3)]
    stack = BDIAStack(layers)
    stack.reversible = reversible
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, 32, generator=g, requires_grad=True)
    pad = torch.zeros(4, 10, dtype=torch.bool)
    pad[1, 7:] = pad[3, 4:] = True
    signs = torch.tensor([[1, -1, 1, -1], [1, 1, -1, -1]])
    torch.manual_seed(2)  # the same dropout in both runs
    out = stack(x, src_key_padding_mask=pad, gammas=signs)
    out[~pad].square().sum().backward()
    return [x.grad, *(p.grad for p in stack.parameters())]


def test_transformer_encoder_layer_with_padding_mask_by_keyword():
    assert max_relative_error(encoder_step(True), encoder_step(False)) <= 1e-5


class DropPathBlock(nn.Module):
    """A ViT block with stochastic depth, as timm writes it: each branch is dropped per sample."""

    def __init__(self, d: int, drop_path: float) -> None:
        super().__init__()
        self.body = TransformerBlock(d, 2)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.drop_path
        mask = torch.rand(x.shape[0], 1, 1).lt(keep).to(x.dtype) / keep
        return x + (self.body(x) - x) * mask


def drop_path_step(reversible: bool) -> list[torch.Tensor | None]:
    torch.manual_seed(0)
    stack = BDIAStack([DropPathBlock(16, 0.3) for _ in range(4)])
    stack.reversible = reversible
    x = torch.randn(8, 6, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(2)
    stack(x).square().sum().backward()
    return [x.grad, *(p.grad for p in stack.parameters())]


def test_drop_path_blocks_equal_plain_autograd():
    assert max_relative_error(drop_path_step(True), drop_path_step(False)) <= 1e-5


class ClosureBlock(nn.Module):
    """Uses a tensor that requires grad but is neither a parameter nor an argument (a leaf held by reference)."""

    def __init__(self, d: int, table: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x) + self.table)


@pytest.mark.parametrize("reversible", [True, False])
def test_leaves_outside_the_parameters_get_the_plain_autograd_gradient(reversible):
    results = []
    for rev in (reversible, False):
        torch.manual_seed(0)
        table = torch.randn(8, requires_grad=True)
        stack = BDIAStack([ClosureBlock(8, table) for _ in range(3)])
        stack.reversible = rev
        stack(torch.randn(4, 8), gammas=torch.tensor([[1, -1, 1, -1], [1, 1, -1, -1]])).square().sum().backward()
        assert table.grad is not None
        results.append([table.grad, *(p.grad for p in stack.parameters())])
    assert max_relative_error(*results) <= 1e-5


def test_higher_order_advice_works_as_written():
    torch.manual_seed(0)
    stack = BDIAStack([TransformerBlock(16, 2) for _ in range(3)])
    x = torch.randn(2, 5, 16, requires_grad=True)
    loss = stack(x).square().sum()
    with pytest.raises(RuntimeError, match="first-order gradients only") as info:
        torch.autograd.grad(loss, x, create_graph=True)[0].sum().backward()
    message = str(info.value)
    assert "stack.reversible = False" in message and "SDPBackend.MATH" in message
    # the advice, followed as written
    stack.reversible = False
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        loss = stack(x).square().sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        gx.square().sum().backward()
    assert all(p.grad is not None for p in stack.parameters())


# -- timm ------------------------------------------------------------------------------------------------


class _AnyName(type):
    """Any attribute of a stub is another stub class, so names used only at import time resolve."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        stub = _AnyName(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(cls, name, stub)
        return stub


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        stub = _AnyName(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, stub)
        return stub


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _drop_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_timm():
    """timm, imported with its real torchvision when that works, else with a stub torchvision that exists
    only during the import: timm imports torchvision at import time for its data pipeline and norm layers,
    which the ViT blocks do not use, and a CPU torch may have no usable torchvision. The stub is removed
    afterwards, so nothing else (transformers) sees it."""
    try:
        import timm
    except ModuleNotFoundError as e:
        if e.name == "timm":
            pytest.skip("timm is not installed (a test dependency: pip install --no-deps timm)")
        if not (e.name or "").startswith("torchvision"):
            raise
    except Exception:  # a torchvision built for another torch fails at import
        pass
    else:
        return timm
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        del sys.modules[name]
    _drop_torchvision()
    finder = _TorchvisionStub()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        _drop_torchvision()
    return timm


def timm_vit():
    timm = import_timm()
    torch.manual_seed(0)
    vit = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3, drop_path_rate=0.2
    )
    vit.blocks = BDIAStack(list(vit.blocks))  # the recipe: the block list becomes one stack
    return vit


@pytest.mark.parametrize("chunks", [1, 2])
def test_timm_vit_with_drop_path_equals_plain_autograd(chunks):
    results = []
    for reversible in (True, False):
        vit = timm_vit()
        vit.blocks.batch_chunks = chunks
        vit.blocks.reversible = reversible
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the same signs g and drop_path masks in both runs
        vit(x).square().sum().backward()
        results.append([p.grad for p in vit.parameters()])
    assert max_relative_error(*results) <= 1e-5


def test_timm_loops_over_blocks_raise_a_clear_error():
    vit = timm_vit()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="BDIAStack cannot be iterated over.*call stack"):
        vit.forward_features(x, attn_mask=torch.zeros(17, 17, dtype=torch.bool))
    vit.set_grad_checkpointing()
    with pytest.raises(TypeError, match="BDIAStack cannot be iterated over"):
        vit(x)


class Unsharding(nn.Module):
    """A wrapper that swaps its block's parameters for fresh copies in every call and hands their gradients
    back to the originals when autograd accumulates them, as FSDP's unshard and reduce-scatter do."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        originals = dict(self.block.named_parameters())
        for name, p in originals.items():
            copy = nn.Parameter(p.detach().clone())
            copy.register_post_accumulate_grad_hook(lambda c, p=p: self._hand_back(c, p))
            self.block.get_submodule(name.rpartition(".")[0]).register_parameter(name.rpartition(".")[2], copy)
        try:
            return self.block(x)
        finally:
            for name, p in originals.items():
                self.block.get_submodule(name.rpartition(".")[0]).register_parameter(name.rpartition(".")[2], p)

    @staticmethod
    def _hand_back(copy: torch.Tensor, original: torch.Tensor) -> None:
        original.grad = copy.grad if original.grad is None else original.grad + copy.grad
        copy.grad = None


def test_parameters_swapped_between_forward_and_backward_get_their_gradients():
    """The recomputation uses parameters the forward never saw: they get the gradient, as under plain autograd."""
    results = []
    for reversible in (True, False):
        torch.manual_seed(0)
        stack = BDIAStack([Unsharding(TransformerBlock(16, 2)) for _ in range(3)])
        stack.reversible = reversible
        x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        stack(x, gammas=torch.tensor([[1, -1, 1, -1], [1, 1, -1, -1]])).square().sum().backward()
        results.append([x.grad, *(p.grad for p in stack.parameters())])
    assert all(g is not None for g in results[0])
    assert max_relative_error(*results) <= 1e-5
