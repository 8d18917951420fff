"""Throughput and model-FLOPs-utilisation arithmetic, and the metric writers of the loop."""

from __future__ import annotations

import json
from pathlib import Path

# Dense bf16 peak FLOP/s per device (one GPU, or one TPU chip), from the vendors' spec sheets.
PEAK_FLOPS = {
    "h100": 989.4e12,  # H100 SXM
    "h200": 989.4e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports itself as "TPU v5"
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
    """The per-device peak for a `jax.Device.device_kind`, or `override` when > 0; None when
    unknown (e.g. CPU), in which case MFU is not reported unless `peak_flops` is configured."""
    if override > 0:
        return override
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int,
        peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the mesh's peak."""
    if not peak_per_device:
        return None
    return tokens_per_second * flops_per_token / (n_devices * peak_per_device)


class MetricsWriter:
    """Appends one JSON object per logged step to `<run_dir>/metrics.jsonl` and writes the
    same scalars as TensorBoard events under `<run_dir>/tensorboard`."""

    def __init__(self, run_dir: str | Path):
        from tensorboardX import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()
