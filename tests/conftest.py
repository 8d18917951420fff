"""Test set-up: 8 emulated CPU devices and one persistent compilation cache for the whole suite
and the subprocesses it starts (environment variables are inherited)."""

import os
from pathlib import Path

# 8 emulated devices. XLA:CPU runs independent ops of one program concurrently; on 2 cores, with
# many programs compiled in one process, a collective of the 8 device threads was seen to wait
# past XLA's 40 s rendezvous limit and abort the run: keep the list schedule and a longer limit.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(os.environ.get("LMSYS_CACHE_DIR", Path.home() / ".cache" / "lmsys")) / "jax-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 emulated devices: import jax only after conftest"
