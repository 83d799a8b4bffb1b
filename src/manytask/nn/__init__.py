"""Multi-task architectures and their parts."""

from manytask.nn.base import MultiTaskModel
from manytask.nn.encoders import CNNEncoder, Encoder, MLPEncoder
from manytask.nn.heads import TaskHead
from manytask.nn.shared_bottom import SharedBottom, build_encoder, shared_bottom

__all__ = [
    "CNNEncoder",
    "Encoder",
    "MLPEncoder",
    "MultiTaskModel",
    "SharedBottom",
    "TaskHead",
    "build_encoder",
    "shared_bottom",
]
