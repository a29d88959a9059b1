"""Point-to-point messages between neighbouring stages over torch.distributed, with deadlines.

A message is a micro-batch id plus a few tensors. On the wire it is an int64 header
``[MAGIC, micro_batch, n, (dtype code, ndim, *shape padded to MAX_NDIM) * n]`` followed by the n
tensors, so shapes and dtypes may change from message to message. Each directed link carries one kind
of message in FIFO order (stage j -> j+1: activations; j+1 -> j: (input, gradient) pairs), so the
receiver knows which micro-batch comes next and checks the header against it.

Sends are non-blocking; receives wait at most ``timeout`` seconds. A neighbour that died or stalled
surfaces as a :class:`PeerError` naming the neighbour and the micro-batch.
"""

from __future__ import annotations

import re
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

MAGIC = 0x5E7A
MAX_NDIM = 6
MAX_TENSORS = 2
HEADER_LEN = 3 + MAX_TENSORS * (2 + MAX_NDIM)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]


class PeerError(RuntimeError):
    """A neighbouring stage did not deliver (or take) a message in time, or its connection broke.
    ``peer``: that stage (None when a collective of every stage failed and no one stage is known)."""

    def __init__(self, message: str, peer: int | None, micro_batch: int) -> None:
        super().__init__(message)
        self.peer = peer
        self.micro_batch = micro_batch


def transport_reason(error: BaseException) -> str:
    """The cause in a gloo error's text, without its source location and advice: "Connection reset by
    peer", "Timed out waiting 3000ms for recv operation to complete"."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # [.../gloo/transport/tcp/pair.cc:537]
    text = re.sub(r"^Read error \[[^\]]*\]:\d+:\s*", "", text)  # Read error [127.0.0.1]:port:
    return text.split(". ")[0].rstrip(".")


class DesyncError(RuntimeError):
    """A message arrived for another micro-batch than the schedule expects: a bug, never a fault."""


def encode_header(micro_batch: int, tensors: list[Tensor]) -> Tensor:
    """The int64 header describing ``tensors`` for ``micro_batch``."""
    if not 1 <= len(tensors) <= MAX_TENSORS:
        raise ValueError(f"a message carries 1 to {MAX_TENSORS} tensors, not {len(tensors)}")
    header = [MAGIC, micro_batch, len(tensors)]
    for t in tensors:
        if t.dtype not in DTYPES or t.dim() > MAX_NDIM:
            raise ValueError(f"cannot send a {t.dtype} tensor of {t.dim()} dims (at most {MAX_NDIM})")
        header += [DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (MAX_NDIM - t.dim())]
    header += [0] * (HEADER_LEN - len(header))
    return torch.tensor(header, dtype=torch.int64)


def decode_header(header: Tensor) -> tuple[int, list[tuple[torch.dtype, list[int]]]]:
    """(micro_batch, [(dtype, shape)]) from a header made by :func:`encode_header`."""
    h = header.tolist()
    if h[0] != MAGIC:
        raise DesyncError(f"bad message header {h[:3]}: the stages do not speak the same protocol")
    specs = []
    for i in range(h[2]):
        code, ndim, *dims = h[3 + i * (2 + MAX_NDIM) : 3 + (i + 1) * (2 + MAX_NDIM)]
        specs.append((DTYPES[code], dims[:ndim]))
    return h[1], specs


class Channel:
    """The messages of stage ``me`` to and from its neighbours, with a deadline on every wait.

    Sent messages stay referenced until :meth:`flush` has seen their sends complete; a send can only
    complete once the neighbour posts the matching receive. Tensors travel on ``wire`` (the GPU under
    NCCL, the CPU under gloo, which is what PETRA uses) and are handed out on ``device``.
    """

    def __init__(
        self, me: int, timeout: float, device: torch.device | str = "cpu", wire: torch.device | str | None = None
    ) -> None:
        self.me = me
        self.timeout = timeout
        self.device = torch.device(device)
        self.wire = self.device if wire is None else torch.device(wire)
        self.pending: deque[tuple[int, int, int, list[dist.Work], list[Tensor]]] = deque()

    def wait(self, work: dist.Work, peer: int, micro_batch: int, what: str) -> None:
        """Wait for one send or receive, at most ``timeout`` seconds."""
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise PeerError(
                f"stage {self.me} gave up on stage {peer} ({what} of micro-batch {micro_batch}, "
                f"timeout {self.timeout:g} s): {transport_reason(e)}",
                peer=peer,
                micro_batch=micro_batch,
            ) from e

    def send(self, peer: int, micro_batch: int, tensors: list[Tensor], step: int) -> None:
        """Post the header and the tensors to ``peer`` without waiting."""
        tensors = [t.detach().to(self.wire).contiguous() for t in tensors]
        header = encode_header(micro_batch, tensors).to(self.wire)
        works = [dist.isend(t, peer) for t in [header, *tensors]]
        self.pending.append((step, peer, micro_batch, works, [header, *tensors]))

    def recv(self, peer: int, micro_batch: int, what: str) -> list[Tensor]:
        """Receive the next message from ``peer``, which must be for ``micro_batch``."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
        self.wait(dist.irecv(header, peer), peer, micro_batch, f"receiving the {what}")
        got, specs = decode_header(header.cpu())
        if got != micro_batch:
            raise DesyncError(
                f"stage {self.me} expected the {what} of micro-batch {micro_batch} from stage {peer}, "
                f"got micro-batch {got}"
            )
        tensors = [torch.empty(shape, dtype=dtype, device=self.wire) for dtype, shape in specs]
        works = [dist.irecv(t, peer) for t in tensors]
        for work in works:
            self.wait(work, peer, micro_batch, f"receiving the {what}")
        return [t.to(self.device) for t in tensors]

    def flush(self, before_step: int | None = None) -> None:
        """Wait for the sends posted before ``before_step`` (all of them if None) and release them."""
        while self.pending and (before_step is None or self.pending[0][0] < before_step):
            _, peer, micro_batch, works, _ = self.pending.popleft()
            for work in works:
                self.wait(work, peer, micro_batch, "handing over a message")
