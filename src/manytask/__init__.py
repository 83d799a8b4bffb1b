"""manytask: multi-task learning for PyTorch.

Train one model on many tasks, balance the tasks, and measure the result::

    import manytask as mt

    data = mt.data.mmoe_synthetic(correlation=0.5)
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder(data.input_shape, [64]), data.tasks)
    balancer = mt.balance.get("dwa", tasks=data.tasks.names)
"""

from manytask import balance, data, evaluate, nn, train
from manytask.config import Config, load_config
from manytask.errors import ConfigError, DataError, ManytaskError, UnknownNameError
from manytask.task import Task, TaskSet

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "ManytaskError",
    "Task",
    "TaskSet",
    "UnknownNameError",
    "__version__",
    "balance",
    "data",
    "evaluate",
    "load_config",
    "nn",
    "train",
]
