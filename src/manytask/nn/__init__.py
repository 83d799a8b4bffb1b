"""Multi-task architectures and their parts."""

from manytask.nn.adatt import AdaTT, adatt
from manytask.nn.base import MultiTaskModel
from manytask.nn.cross_stitch import CrossStitchNetwork, cross_stitch_network
from manytask.nn.encoders import CNNEncoder, Encoder, MLPEncoder
from manytask.nn.esmm import ESMM, ctcvr_logit, esmm
from manytask.nn.experts import ExpertBank
from manytask.nn.gates import (
    DSelectKGate,
    FeatureGate,
    Gate,
    HierarchicalGate,
    NoisyTopKGate,
    SoftmaxGate,
    smooth_step,
)
from manytask.nn.heads import TaskHead
from manytask.nn.home import HoME, home
from manytask.nn.mmoe import MultiGateMoE, OneGateMoE, dselect_k, mmoe, moe
from manytask.nn.mtan import MTAN, mtan
from manytask.nn.ple import PLE, cgc, ple
from manytask.nn.shared_bottom import SharedBottom, build_encoder, shared_bottom
from manytask.nn.staged import StagedModel

__all__ = [
    "ESMM",
    "MTAN",
    "PLE",
    "AdaTT",
    "CNNEncoder",
    "CrossStitchNetwork",
    "DSelectKGate",
    "Encoder",
    "ExpertBank",
    "FeatureGate",
    "Gate",
    "HierarchicalGate",
    "HoME",
    "MLPEncoder",
    "MultiGateMoE",
    "MultiTaskModel",
    "NoisyTopKGate",
    "OneGateMoE",
    "SharedBottom",
    "SoftmaxGate",
    "StagedModel",
    "TaskHead",
    "adatt",
    "build_encoder",
    "cgc",
    "cross_stitch_network",
    "ctcvr_logit",
    "dselect_k",
    "esmm",
    "home",
    "mmoe",
    "moe",
    "mtan",
    "ple",
    "shared_bottom",
    "smooth_step",
]
