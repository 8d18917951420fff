"""Training: the pure step (lmsys.train.step) and the loop around it (lmsys.train.loop)."""

from lmsys.train.step import Trainer

__all__ = ["Trainer", "train"]


def train(*args, **kwargs):
    """See lmsys.train.loop.train (imported on use: the loop pulls in data and metric libraries)."""
    from lmsys.train.loop import train as _train

    return _train(*args, **kwargs)
