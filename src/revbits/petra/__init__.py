"""PETRA (Rivaud et al., ICLR 2025): decoupled stage-parallel training of reversible networks, one
process per stage over torch.distributed.

    stages = revnet_pipeline(J)                                  # or split(pieces, J)
    launch(J, run_stage, (partial(revnet_pipeline, J), data, PetraConfig(stages=J, ...)))

Under torchrun, call ``run_stage(None, None, build_stages, data, config)`` in every process.

The modules here are the stage runtime and import no model; :mod:`revbits.petra.pieces` cuts the models
of :mod:`revbits.models` into pieces, and its public names are re-exported here.
"""

from .baselines import run_pipeline_baseline
from .comm import DesyncError, PeerError
from .launch import StageFailure, launch
from .pieces import (
    BDIAEntry,
    BDIAExit,
    BDIAStep,
    ClassifierHead,
    RevCouplingBlock,
    RevNetStage,
    bdia_gpt_pipeline,
    bdia_pieces,
    gpt_pieces,
    revnet_pieces,
    revnet_pipeline,
    small_revnet,
    vit_pieces,
)
from .record import StageRecord, load_records
from .reference import backprop_reference
from .runtime import PetraConfig, StageSummary, run_stage
from .schedule import delay
from .stages import LastStage, LossStage, PlainStage, SequentialStage, Stage, balanced_sizes, split

__all__ = [
    "BDIAEntry",
    "BDIAExit",
    "BDIAStep",
    "bdia_gpt_pipeline",
    "bdia_pieces",
    "gpt_pieces",
    "ClassifierHead",
    "DesyncError",
    "LastStage",
    "LossStage",
    "PeerError",
    "PetraConfig",
    "PlainStage",
    "RevCouplingBlock",
    "RevNetStage",
    "SequentialStage",
    "Stage",
    "StageFailure",
    "StageRecord",
    "StageSummary",
    "backprop_reference",
    "balanced_sizes",
    "delay",
    "launch",
    "load_records",
    "revnet_pieces",
    "revnet_pipeline",
    "run_pipeline_baseline",
    "run_stage",
    "small_revnet",
    "split",
    "vit_pieces",
]
