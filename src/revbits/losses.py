"""Cross-entropy of a linear head, computed in chunks of tokens so the full logits never exist at once.

For hidden states h_i (one per token), a head z_i = W h_i (any module: a Linear, a PEFT LoRA Linear,
a Linear tied to the embedding), optionally soft-capped z_i <- c tanh(z_i / c) (Gemma 2), and labels y_i:

    loss_i = logsumexp(z_i) - z_i[y_i] + z_loss * logsumexp(z_i)^2        (y_i != ignore_index)
    mean   = sum_i loss_i / #{i : y_i != ignore_index}   (or / num_items_in_batch when given)

The plain way holds the logits z (tokens x vocabulary), their log-softmax and their gradient: at a
150k vocabulary that is 0.6 MB per token in float32, more than all layers of a 1B model store.
:func:`linear_cross_entropy` splits the tokens into chunks and runs each chunk's head and loss under a
non-reentrant :func:`torch.utils.checkpoint.checkpoint`: the forward keeps only the chunk's hidden
states (views of the input, no copy) and labels; the backward recomputes one chunk's logits at a time.
Peak memory of the head and loss is then one chunk's logits (a few copies), whatever the length.

Why checkpoint per chunk rather than a custom Function that computes the gradients during the forward
(Liger Kernel's way, which saves the recomputation): the checkpoint runs the head module itself, so the
gradients reach every parameter the module uses (LoRA adapters, a weight tied to the embedding, FSDP's
parameter hooks) through ordinary autograd, with nothing to know about the module. The price is one
more head matmul per step (the recomputation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: With ``chunk_tokens=None`` a chunk holds about this many logits (128 MiB in float32): a 151,936-token
#: vocabulary gets 220 tokens per chunk. Large enough for the head's matmul to be compute-bound on a GPU.
CHUNK_LOGITS = 2**25
REDUCTIONS = ("mean", "sum", "none")

Head = nn.Module | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: Head,
    labels: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: float | None = None,
    z_loss: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``labels``, chunk by chunk (see the module docstring).

    Args:
        hidden: hidden states [..., d] (e.g. [B, T, d]), the head's input.
        head: the output projection: a module called on the hidden states (nn.Linear, a PEFT-wrapped
            Linear, ...), an nn.Embedding (its weight is the projection, as when tied), a weight tensor
            [vocab, d] (logits = hidden @ weight^T), or any callable from hidden states to logits.
        labels: integer targets of shape hidden.shape[:-1]; ``ignore_index`` marks tokens without a loss.
        chunk_tokens: tokens per chunk. None: about :data:`CHUNK_LOGITS` logits per chunk, from the
            head's output size (pass it explicitly for a callable head whose size cannot be read).
        ignore_index: the label of tokens that contribute nothing (loss 0, not counted in the mean).
        shift: predict the next token, as transformers' causal LMs do: labels[..., t + 1] is the target
            of position t, and the last position has none.
        softcap: c in z <- c tanh(z / c), applied to the logits before the loss (Gemma 2's
            ``final_logit_softcapping``).
        z_loss: the weight of logsumexp(z)^2 added per token (PaLM's z-loss); 0 adds nothing.
        reduction: "mean" (over non-ignored tokens, or over ``num_items_in_batch``), "sum", or "none"
            (per-token losses of labels' shape, 0 where ignored).
        num_items_in_batch: transformers' divisor for "mean" under gradient accumulation (the count of
            non-ignored tokens across the accumulated micro-batches).

    Logits of float16/bfloat16 heads are upcast to float32 per chunk (after the soft-cap, as
    transformers does); float32 and float64 logits are used as they are.

    Returns:
        a scalar, or the per-token losses for ``reduction="none"``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: labels of shape {tuple(labels.shape)} do not match the hidden states' "
            f"leading dimensions {tuple(hidden.shape[:-1])}"
        )
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    labels = labels.to(hidden.device)
    project = _projection(head)
    size = chunk_tokens if chunk_tokens is not None else _default_chunk(head)
    if size < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _token_losses(project(h), y, ignore_index, softcap, z_loss, summed=reduction != "none")

    pieces = []
    for h, y in zip(torch.split(flat_hidden, size), torch.split(flat_labels, size)):
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_loss, h, y, use_reentrant=False))
        else:
            pieces.append(chunk_loss(h, y))
    if reduction == "none":
        return torch.cat(pieces).view(labels.shape)
    total = torch.stack(pieces).sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (flat_labels != ignore_index).sum()


def _token_losses(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float | None, z_loss: float, summed: bool
) -> torch.Tensor:
    """The losses of one chunk: their sum (``summed``) or one per token."""
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum" if summed else "none")
    if z_loss:
        log_z = torch.logsumexp(logits, dim=-1)
        penalty = z_loss * log_z.square() * (labels != ignore_index)
        losses = losses + (penalty.sum() if summed else penalty)
    return losses


def _projection(head: Head) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(head, torch.Tensor):
        return lambda h: F.linear(h, head)
    if isinstance(head, nn.Embedding):
        return lambda h: F.linear(h, head.weight)
    if callable(head):
        return head
    raise TypeError(f"head must be a module, a weight tensor or a callable, got {type(head).__name__}")


def _default_chunk(head: Head) -> int:
    vocab = _output_size(head)
    if vocab is None:
        raise ValueError(
            f"linear_cross_entropy: cannot read the output size of the head {type(head).__name__}; pass chunk_tokens"
        )
    return max(1, CHUNK_LOGITS // vocab)


def _output_size(head: Head) -> int | None:
    if isinstance(head, torch.Tensor):
        return head.shape[0]
    if isinstance(head, nn.Embedding):
        return head.num_embeddings
    size = getattr(head, "out_features", None)  # nn.Linear and PEFT's LoRA Linear
    if isinstance(size, int):
        return size
    weight = getattr(head, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


__all__ = ["CHUNK_LOGITS", "linear_cross_entropy"]
