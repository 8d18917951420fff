"""Reinforcement learning from rewards (`lmsys rl`): the trainer (lmsys.train, with the GRPO
objective of lmsys.train.grpo) and the serving engine (lmsys.serve) in one process."""

from lmsys.rl.loop import rl

__all__ = ["rl"]
