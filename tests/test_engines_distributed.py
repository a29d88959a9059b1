"""BDIA under FSDP2, FSDP1 and DDP: 2 gloo processes on CPU, gradients equal to one process on the whole batch.

One spawn runs every scenario (process start-up dominates); rank 0 writes the full gradients of each, and
the tests compare them with plain autograd (``reversible = False``) on the whole batch in this process.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from revbits import BDIAStack
from revbits.models import TransformerBlock

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

WORLD = 2
BATCH = 8  # 4 samples per rank; DDP's no_sync scenario runs them as 2 micro-batches of 2
D_MODEL = 16


class Block(nn.Module):
    """A transformer block with a parameter it never uses (plain autograd leaves its grad None)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TransformerBlock(D_MODEL, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Model(nn.Module):
    def __init__(self, batch_chunks: int = 1) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D_MODEL)
        self.stack = BDIAStack([Block() for _ in range(3)], batch_chunks=batch_chunks)
        self.head = nn.Linear(D_MODEL, 1)

    def forward(self, x: torch.Tensor, signs: torch.Tensor, delta: torch.Tensor | None = None) -> Any:
        """The loss; with ``delta`` (FGSM), (the loss of the embeddings + delta, the embeddings)."""
        if delta is None:
            return self.head(self.stack(self.embed(x), gammas=signs)).square().mean()
        emb = self.embed(x)
        return self.head(self.stack(emb + delta, gammas=signs)).square().mean(), emb


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 5, 8, generator=g).to(dtype)
    signs = torch.randint(0, 2, (2, BATCH), generator=g) * 2 - 1
    return x, signs


def model(batch_chunks: int = 1) -> Model:
    torch.manual_seed(0)
    return Model(batch_chunks)


def reference() -> dict[str, torch.Tensor | None]:
    """One process, the whole batch, plain autograd on the same forward."""
    m = model()
    m.stack.reversible = False
    x, signs = data()
    m(x, signs).backward()
    return {n: p.grad for n, p in m.named_parameters()}


# -- the scenarios, run in each of the 2 processes ----------------------------------------------------------


def _local(rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    x, signs = data(dtype)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[rows], signs[:, rows]


def _strip(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _fsdp2(rank: int, where: str, batch_chunks: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    m = model(batch_chunks)
    if where == "blocks":
        for block in m.stack.blocks:
            fully_shard(block)
    if where in ("blocks", "stack"):
        fully_shard(m.stack)
    fully_shard(m)
    x, signs = _local(rank)
    m(x, signs).backward()
    return {n: None if p.grad is None else p.grad.full_tensor() for n, p in m.named_parameters()}


def _fsdp1(rank: int, use_orig_params: bool, reversible: bool = True, per_block: bool = True) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    m = model()
    m.stack.reversible = reversible
    policy = ModuleWrapPolicy({Block} if per_block else set())
    m = FSDP(m, use_orig_params=use_orig_params, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    x, signs = _local(rank)
    m(x, signs).backward()
    if use_orig_params:
        with FSDP.summon_full_params(m, with_grads=True):
            return {_strip(n): None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    # summon_full_params cannot gather the gradients of flat parameters: gather each rank's shard of them
    grads = {}
    for n, p in m.named_parameters():
        shards = [torch.empty_like(p.grad) for _ in range(WORLD)]
        dist.all_gather(shards, p.grad)
        grads[n] = torch.cat(shards)
    return grads


def _ddp(rank: int, reversible: bool) -> dict:
    m = model()
    m.stack.reversible = reversible
    ddp = nn.parallel.DistributedDataParallel(m, find_unused_parameters=True)
    x, signs = _local(rank)
    half = x.shape[0] // 2
    with ddp.no_sync():  # gradient accumulation: the first micro-batch is not all-reduced
        (ddp(x[:half], signs[:, :half]) / 2).backward()
    (ddp(x[half:], signs[:, half:]) / 2).backward()
    return {n: p.grad for n, p in m.named_parameters()}


FGSM_EPS = 0.05


def fgsm(m: nn.Module, x: torch.Tensor, signs: torch.Tensor, how: str) -> list[str]:
    """An adversarial step on the embeddings, their gradient by ``autograd.grad`` or ``backward(inputs=)``,
    then the training backward; returns the parameters the first backward gave a ``.grad`` (plain autograd:
    none)."""
    loss, emb = m(x, signs, torch.zeros(()))
    if how == "grad":
        (grad,) = torch.autograd.grad(loss, emb)
    else:
        loss.backward(inputs=[emb])
        grad = emb.grad
    touched = [n for n, p in m.named_parameters() if p.grad is not None]
    m(x, signs, FGSM_EPS * grad.sign())[0].backward()
    return touched


def fgsm_reference() -> dict[str, torch.Tensor | None]:
    """FGSM and training in one process on the whole batch in float64, plain autograd."""
    m = model().double()
    m.stack.reversible = False
    assert fgsm(m, *data(torch.float64), "grad") == []
    return {n: p.grad for n, p in m.named_parameters()}


def _fgsm_fsdp(rank: int, fsdp: str, how: str) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    m = model().double()
    if fsdp == "fsdp2":
        for block in m.stack.blocks:
            fully_shard(block)
        fully_shard(m)
    else:
        m = FSDP(m, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"))
    touched = fgsm(m, *_local(rank, torch.float64), how)
    if fsdp == "fsdp2":
        grads = {n: None if p.grad is None else p.grad.full_tensor() for n, p in m.named_parameters()}
    else:
        with FSDP.summon_full_params(m, with_grads=True):
            grads = {_strip(n): None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    return {"touched": touched, "grads": grads}


def _fsdp2_bf16(rank: int, recipe: bool) -> dict:
    """FSDP2 with bfloat16 parameters: as usually written (one policy everywhere), or with the recipe of
    the error message (float32 block outputs, no cast of the root's parameters)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    usual = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    float32_out = MixedPrecisionPolicy(param_dtype=torch.bfloat16, output_dtype=torch.float32)
    m = model()
    for block in m.stack.blocks:
        fully_shard(block, mp_policy=float32_out if recipe else usual)
    fully_shard(m, mp_policy=MixedPrecisionPolicy() if recipe else usual)
    m(*_local(rank)).backward()
    return {n: None if p.grad is None else p.grad.full_tensor() for n, p in m.named_parameters()}


SCENARIOS = {
    "fsdp2 on each block": lambda rank: _fsdp2(rank, "blocks", 1),
    "fsdp2 on each block, 2 batch chunks": lambda rank: _fsdp2(rank, "blocks", 2),
    "fsdp2 on the stack, 2 batch chunks": lambda rank: _fsdp2(rank, "stack", 2),
    "fsdp2 on the root": lambda rank: _fsdp2(rank, "root", 1),
    "fsdp1 use_orig_params=True": lambda rank: _fsdp1(rank, True),
    "fsdp1 use_orig_params=True, plain autograd": lambda rank: _fsdp1(rank, True, reversible=False),
    "fsdp1 use_orig_params=False": lambda rank: _fsdp1(rank, False),
    "fsdp1 use_orig_params=False, plain autograd": lambda rank: _fsdp1(rank, False, reversible=False),
    "fsdp1 root only": lambda rank: _fsdp1(rank, True, per_block=False),
    "ddp no_sync": lambda rank: _ddp(rank, True),
    "ddp no_sync, plain autograd": lambda rank: _ddp(rank, False),
    "fgsm by autograd.grad, fsdp2 on each block": lambda rank: _fgsm_fsdp(rank, "fsdp2", "grad"),
    "fgsm by backward(inputs=), fsdp2 on each block": lambda rank: _fgsm_fsdp(rank, "fsdp2", "inputs"),
    "fgsm by autograd.grad, fsdp1 on each block": lambda rank: _fgsm_fsdp(rank, "fsdp1", "grad"),
    "fgsm by backward(inputs=), fsdp1 on each block": lambda rank: _fgsm_fsdp(rank, "fsdp1", "inputs"),
    "fsdp2 bf16 parameters as usually written": lambda rank: _fsdp2_bf16(rank, recipe=False),
    "fsdp2 bf16 parameters, the recipe": lambda rank: _fsdp2_bf16(rank, recipe=True),
}


def _worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, dict | str] = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(rank)
            except Exception:  # reported by the test of this scenario
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp("engines") / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    return torch.load(path, weights_only=False)


def _assert_equal_to_reference(grads: dict | str, expected: dict) -> None:
    assert isinstance(grads, dict), grads  # the traceback of a failed scenario
    assert set(grads) == set(expected)
    for name, want in expected.items():
        got = grads[name]
        if want is None:
            assert got is None, f"{name}: plain autograd gives None, got a gradient"
            continue
        assert got is not None, f"{name}: trainable parameter ended the backward without a gradient"
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
        assert err <= 1e-5, f"{name}: relative error {err:.3g}"


NOT_COMPARED_HERE = ("each block, 2", "=False", "root only", "plain", "bf16")  # errors, flat parameters, bf16
FSDP_EXACT = [n for n in SCENARIOS if n.startswith("fsdp") and not any(k in n for k in NOT_COMPARED_HERE)]
FGSM = [n for n in SCENARIOS if n.startswith("fgsm")]


def test_fsdp_per_block_refuses_batch_chunks(distributed):
    """A block that is its own FSDP unit reduces its gradients after each recomputation: chunks would lose some."""
    message = distributed["fsdp2 on each block, 2 batch chunks"]
    assert isinstance(message, str) and "batch_chunks=2: block 0 is its own FSDP unit" in message


@pytest.mark.parametrize("name", FSDP_EXACT)
def test_fsdp_gradients_equal_one_process(distributed, name):
    expected = reference()
    # FSDP gives unused parameters a gradient only where the reduce-scatter of a None is defined; compare
    # the used ones, and check the unused ones separately below
    used = {n: g for n, g in expected.items() if g is not None}
    grads = distributed[name]
    assert isinstance(grads, dict), grads
    _assert_equal_to_reference({n: grads[n] for n in used}, used)


@pytest.mark.parametrize("name", [n for n in FSDP_EXACT if n.startswith("fsdp2")])
def test_fsdp2_unused_parameters_get_none(distributed, name):
    grads = distributed[name]
    assert isinstance(grads, dict), grads
    unused = [n for n in grads if ".unused." in n]
    assert unused and all(grads[n] is None for n in unused)


def test_fsdp1_unused_parameters_as_under_plain_autograd(distributed):
    """FSDP1's flat gradient gives unused original parameters zeros, with or without BDIA."""
    bdia, plain = distributed["fsdp1 use_orig_params=True"], distributed["fsdp1 use_orig_params=True, plain autograd"]
    assert isinstance(bdia, dict) and isinstance(plain, dict)
    unused = [n for n in plain if ".unused." in n]
    assert unused
    _assert_equal_to_reference({n: bdia[n] for n in unused}, {n: plain[n] for n in unused})


def test_fsdp1_flat_parameters_equal_plain_autograd(distributed):
    """use_orig_params=False: the flat parameters' gradients (all shards) equal plain autograd's under FSDP1."""
    bdia, plain = distributed["fsdp1 use_orig_params=False"], distributed["fsdp1 use_orig_params=False, plain autograd"]
    assert isinstance(plain, dict), plain
    assert len(plain) == 4  # the root's flat parameter and one per block
    _assert_equal_to_reference(bdia, plain)


def test_fsdp1_with_blocks_in_an_outer_unit_raises_a_clear_error(distributed):
    """FSDP1 reshards an outer unit when its gradient is accumulated, before the next block is recomputed."""
    message = distributed["fsdp1 root only"]
    assert isinstance(message, str) and "RecomputationError" in message
    assert "wrap each block in its own FSDP unit" in message


def test_ddp_no_sync_gradients_equal_one_process(distributed):
    _assert_equal_to_reference(distributed["ddp no_sync"], reference())


def test_ddp_unused_parameters_as_under_plain_autograd(distributed):
    bdia, plain = distributed["ddp no_sync"], distributed["ddp no_sync, plain autograd"]
    assert isinstance(bdia, dict) and isinstance(plain, dict)
    unused = [n for n in plain if ".unused." in n]
    assert unused and all(plain[n] is None for n in unused)
    assert all(bdia[n] is None for n in unused)


@pytest.mark.parametrize("name", FGSM)
def test_fgsm_under_fsdp_per_block_equals_plain_autograd(distributed, name):
    """The embeddings' gradient alone leaves every .grad None, and the training step after the adversarial
    one has plain autograd's gradients to 1e-9 in float64."""
    result = distributed[name]
    assert isinstance(result, dict), result
    assert result["touched"] == [], f"the embeddings' gradient wrote .grad of {result['touched']}"
    expected = {n: g for n, g in fgsm_reference().items() if g is not None}
    grads = {n: result["grads"][n] for n in expected}
    assert all(g is not None for g in grads.values())
    worst = {n: (grads[n] - want).abs().max().item() / want.abs().max().item() for n, want in expected.items()}
    assert max(worst.values()) <= 1e-9, worst


def test_fsdp2_bf16_parameters_get_the_fix_in_the_error(distributed):
    message = distributed["fsdp2 bf16 parameters as usually written"]
    assert isinstance(message, str) and "TypeError: the residual stream must be float32" in message
    assert "output_dtype=torch.float32" in message and "cast_forward_inputs=False" in message


def test_fsdp2_bf16_recipe_of_the_error_message_trains(distributed):
    """The recipe runs, and every used parameter gets a finite gradient close to float32 plain autograd's."""
    grads = distributed["fsdp2 bf16 parameters, the recipe"]
    assert isinstance(grads, dict), grads
    expected = {n: g for n, g in reference().items() if g is not None}
    for name, want in expected.items():
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        err = (grads[name].float() - want).abs().max().item() / want.abs().max().item()
        assert err <= 0.1, f"{name}: relative error {err:.3g}"
