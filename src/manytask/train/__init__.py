"""Training: the Trainer, run directories, checkpoints, config-driven runs and comparisons."""

from manytask.train.build import Experiment, build_experiment, run_training, seed_everything
from manytask.train.compare import compare
from manytask.train.rundir import RunDirectory
from manytask.train.trainer import EarlyStopping, Trainer, TrainState

__all__ = [
    "EarlyStopping",
    "Experiment",
    "RunDirectory",
    "TrainState",
    "Trainer",
    "build_experiment",
    "compare",
    "run_training",
    "seed_everything",
]
