"""The model, kernels, train-step and engine paths import only the core stack (jax, optax,
orbax, numpy), so they run on an accelerator host with nothing else installed."""

import subprocess
import sys

HEAVY = ("grain", "tokenizers", "tensorboardX", "yaml", "tqdm", "fastapi", "uvicorn", "qwix", "torch",
         "transformers", "mlflow", "prometheus_client")


def test_core_paths_import_no_heavy_libraries():
    code = ("import sys, lmsys, lmsys.config, lmsys.models, lmsys.kernels, lmsys.parallel, "
            "lmsys.train.step, lmsys.checkpoint, lmsys.serve.engine; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
