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
    same scalars as TensorBoard events under `<run_dir>/tensorboard`. `run_dir` may be a URL
    (gs://, s3://): object stores cannot append, so there metrics.jsonl is rewritten whole at
    each write (through etils.epath), and tensorboardX writes the events itself."""

    def __init__(self, run_dir):
        from tensorboardX import SummaryWriter

        from lmsys.checkpoint import is_url, path_or_url

        root = path_or_url(run_dir)
        self.path = root / "metrics.jsonl"
        if is_url(run_dir):
            self.file = None
            self.text = self.path.read_text() if self.path.exists() else ""
        else:
            self.file = self.path.open("a")
        self.tb = SummaryWriter(str(root / "tensorboard"))

    def write(self, metrics: dict) -> None:
        line = json.dumps(metrics) + "\n"
        if self.file is None:
            self.text += line
            self.path.write_text(self.text)
        else:
            self.file.write(line)
            self.file.flush()
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.tb.close()
