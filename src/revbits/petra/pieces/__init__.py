"""Models cut into PETRA pieces: :class:`revbits.petra.stages.Stage` modules (and one loss head) that share
the model's modules, ready for :func:`revbits.petra.split`. The runtime (the rest of :mod:`revbits.petra`)
knows nothing of models; this package is where they meet it.

    bdia.py     the pieces of any BDIAStack: entry, steps, exit (generic over the blocks)
    gpt.py      a revbits GPT: stem, BDIA pieces, head; a small GPT built and cut (tests, benchmarks)
    vit.py      a revbits ViT: stem, BDIA pieces, head
    revnet.py   a revbits RevNet: conv stages, coupling stages, classifier head
    streams.py  the random stream of each piece, by one rule (derive_seed)
"""

from .bdia import BDIAEntry, BDIAExit, BDIAStep, bdia_pieces, stack_pieces
from .gpt import GPTHead, GPTStem, bdia_gpt_pieces, bdia_gpt_pipeline, gpt_pieces
from .revnet import ClassifierHead, RevCouplingBlock, RevNetStage, revnet_pieces, revnet_pipeline, small_revnet
from .vit import ViTHead, ViTStem, vit_pieces

__all__ = [
    "BDIAEntry",
    "BDIAExit",
    "BDIAStep",
    "ClassifierHead",
    "GPTHead",
    "GPTStem",
    "RevCouplingBlock",
    "RevNetStage",
    "ViTHead",
    "ViTStem",
    "bdia_gpt_pieces",
    "bdia_gpt_pipeline",
    "bdia_pieces",
    "gpt_pieces",
    "revnet_pieces",
    "revnet_pipeline",
    "small_revnet",
    "stack_pieces",
    "vit_pieces",
]
