"""A JAX profiler trace of a window of training steps (the `profile.*` config keys).

    lmsys train recipes/configs/tiny.yaml profile.steps=3 profile.start_step=5
    tensorboard --logdir runs/tiny/profile        # the "Profile" tab; or open the
    # plugins/profile/<time>/*.trace.json.gz in https://ui.perfetto.dev

The trace starts just before step `start_step` runs and stops once step
`start_step + steps - 1`'s outputs exist (the loop dispatches steps ahead of the device, so
the window is waited for at both ends: the trace holds exactly those steps' device work, and
their host-side gaps). With several processes each writes its own trace, into
`<dir>/process_<i>`.
"""

from __future__ import annotations

from pathlib import Path

import jax

from lmsys.config import Config


def profile_dir(cfg: Config, process_index: int, process_count: int) -> Path:
    """Where this process's trace goes: profile.dir (default <run_dir>/profile), with a
    process_<i> subdirectory per process when there are several."""
    root = Path(cfg.profile.dir or Path(cfg.run_dir) / "profile")
    return root / f"process_{process_index}" if process_count > 1 else root


class StepProfiler:
    """Starts and stops the trace around the configured steps; inert when profile.steps = 0
    (or when the window lies before a resumed run's first step)."""

    def __init__(self, cfg: Config):
        p = cfg.profile
        self.first, self.last = p.start_step, p.start_step + p.steps - 1
        self.enabled = p.steps > 0
        self.directory = profile_dir(cfg, jax.process_index(), jax.process_count())
        self.active = False

    def before_step(self, step: int, state) -> None:
        """Call before running `step` (1-based) with the state it starts from."""
        if self.enabled and step == self.first and not self.active:
            jax.block_until_ready(state)  # earlier steps' work stays out of the trace
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        """Call after `step` was dispatched, with its outputs."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a running trace (at the window's end, or when the run stops early)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
