"""PETRA (Rivaud et al., ICLR 2025): decoupled stage-parallel training of reversible networks, one
process per stage over torch.distributed.

    stages = revnet_pipeline(J)                                  # or split(pieces, J)
    launch(J, run_stage, (partial(revnet_pipeline, J), data, PetraConfig(stages=J, ...)))

Under torchrun, call ``run_stage(None, None, build_stages, data, config)`` in every process.
"""

from .baselines import run_pipeline_baseline
from .bdia_pieces import BDIAEntry, BDIAExit, BDIAStep, bdia_gpt_pipeline, bdia_pieces, gpt_pieces
from .comm import DesyncError, PeerError
from .launch import StageFailure, launch
from .record import StageRecord, load_records
from .reference import backprop_reference
from .revnet import ClassifierHead, RevCouplingBlock, RevNetStage, revnet_pipeline, small_revnet
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
    "revnet_pipeline",
    "run_pipeline_baseline",
    "run_stage",
    "small_revnet",
    "split",
]
