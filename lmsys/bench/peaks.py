"""The chip's measured ceilings and the MFU arithmetic of the GPU benchmarks.

    python -m lmsys.bench.peaks            # bf16 matmul TFLOP/s and copy GB/s of device 0

MFU here is model FLOPs over time, never hardware FLOPs: the FLOPs per token are
`lmsys.models.llama.flops_per_token` (what `lmsys train` logs as `mfu`):

    6 x N_matmul + 12 x L x n_heads x head_dim x seq_len

N_matmul the parameters used in matmuls (the output projection, not the embedding lookup, no
norms), the second term PaLM's attention FLOPs (QK^T and AV, forward + backward), which counts
the full T x T score matrix. A causal model computes only half of it, so `mfu_causal` also
reports 6 x N_matmul + 6 x L x n_heads x head_dim x seq_len (MaxText's convention); remat's
recomputation is never counted. Peaks: the datasheet dense bf16 figure
(`lmsys.train.metrics.PEAK_FLOPS`, H100 SXM / H200 989 TFLOP/s) and the measured rate of a large
bf16 matmul on the same chip (`matmul_peak`).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from lmsys.bench.attention import time_call
from lmsys.config import ModelConfig
from lmsys.models import llama
from lmsys.train.metrics import peak_flops


def matmul_peak(n: int = 8192, iters: int = 20, reps: int = 5, sets: int = 3) -> float:
    """FLOP/s of an n x n x n bf16 matmul (fp32 accumulation, bf16 out) on device 0, on random
    inputs (never zeros: they can run faster than real data)."""
    keys = jax.random.split(jax.random.key(0), 2 * sets)
    args = [(jax.random.normal(keys[2 * i], (n, n), jnp.bfloat16),
             jax.random.normal(keys[2 * i + 1], (n, n), jnp.bfloat16)) for i in range(sets)]
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2.0 * n ** 3 / time_call(f, args, iters, reps)


def copy_bandwidth(mib: int = 2048, iters: int = 20, reps: int = 5) -> float:
    """Bytes read + written per second by an elementwise pass over a `mib` MiB bf16 array."""
    x = jax.random.normal(jax.random.key(1), (mib << 19,), jnp.bfloat16)
    f = jax.jit(lambda x: x * 2)
    return 2.0 * x.nbytes / time_call(f, [(x,)], iters, reps)


def peak_memory(device=None) -> int | None:
    """The device's peak bytes in use so far (None where the backend keeps no such count, e.g.
    CPU)."""
    stats = (device or jax.devices()[0]).memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def causal_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """`llama.flops_per_token` with the attention term halved (causal attention computes half
    of the T x T scores)."""
    return llama.flops_per_token(cfg, seq_len) - 6.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def mfu_figures(tokens_per_second: float, cfg: ModelConfig, seq_len: int, n_devices: int,
                device_kind: str, measured_peak: float | None = None,
                peak_override: float = 0.0) -> dict:
    """Model FLOP/s and MFU against the datasheet peak (None when the kind is unknown) and
    against `measured_peak` (None when not measured), with the full and causal attention term."""
    full, causal = llama.flops_per_token(cfg, seq_len), causal_flops_per_token(cfg, seq_len)
    datasheet = peak_flops(device_kind, peak_override)
    out = {"model_tflops": tokens_per_second * full / n_devices / 1e12,
           "datasheet_peak_tflops": datasheet and datasheet / 1e12,
           "measured_peak_tflops": measured_peak and measured_peak / 1e12}
    for name, peak in (("datasheet", datasheet), ("measured", measured_peak)):
        for suffix, fpt in (("", full), ("_causal", causal)):
            out[f"mfu_{name}{suffix}"] = (tokens_per_second * fpt / (n_devices * peak)) if peak else None
    return out


def check_positive(ap: argparse.ArgumentParser, args, names) -> None:
    """Refuses (argparse's error, exit 2) any of `names` below 1, naming its flag."""
    for name in names:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def write_json(path: str, result: dict) -> dict:
    """Writes `result` to `path` when one is given (the benches' --json); returns it."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="matmul size n (n x n x n)")
    ap.add_argument("--copy-mib", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    check_positive(ap, args, ("n", "copy_mib", "iters", "reps"))
    dev = jax.devices()[0]
    flops = matmul_peak(args.n, args.iters, args.reps)
    bw = copy_bandwidth(args.copy_mib, args.iters, args.reps)
    sheet = peak_flops(dev.device_kind)
    print(f"device        {dev.device_kind} (backend {jax.default_backend()}, jax {jax.__version__})")
    print(f"bf16 matmul   {args.n}^3: {flops / 1e12:.1f} TFLOP/s"
          + (f" ({100 * flops / sheet:.0f}% of the datasheet {sheet / 1e12:.0f})" if sheet else ""))
    print(f"copy          {args.copy_mib} MiB bf16: {bw / 1e9:.0f} GB/s (read + write)")
    result = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "matmul_tflops": flops / 1e12, "copy_gbs": bw / 1e9,
              "datasheet_tflops": sheet and sheet / 1e12, "matmul_n": args.n}
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
