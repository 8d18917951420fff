"""The PyTorch + transformers peer of lmsys's train step, for `python -m lmsys.bench.train
--peer torch`: the same model (lmsys's parameters, exported by lmsys's exporter and loaded by
`transformers.AutoModelForCausalLM`, a LlamaForCausalLM for the Llama presets) trained on the
same batch in the same process, the way a PyTorch user would on a GPU:

- float32 parameters and AdamW moments, bf16 compute under `torch.autocast` (lmsys's `dtype:
  bfloat16` keeps the same float32 state);
- SDPA attention (`attn_implementation="sdpa"`: flash attention on Hopper for causal bf16);
- `torch.compile` of the forward + loss (the backward through AOTAutograd);
- fused AdamW (`fused=True`), global-norm clipping like lmsys's optimizer;
- with lmsys's `remat` other than none: transformers' per-layer gradient checkpointing (the
  closest it has; lmsys's `selective` keeps more than that);
- the loss: token cross-entropy in float32 over the whole [batch, seq, vocab] logits, masked
  mean (transformers' own loss does the same upcast); lmsys's `loss_chunk` has no peer here.

On a CPU (tests, `--peer-cpu`) the peer runs in float32 without torch.compile.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np

from lmsys.config import Config


def unavailable(allow_cpu: bool = False) -> str | None:
    """Why the torch peer cannot run beside JAX here, or None when it can."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install torch transformers)"

    backend = jax.default_backend()
    if torch.cuda.is_available():
        if backend != "gpu":
            return f"torch sees CUDA but JAX runs on {backend}: the two would not share one chip"
        return None
    if allow_cpu and backend == "cpu":
        return None
    return (f"no CUDA device for torch (torch {torch.__version__}: torch.cuda.is_available() is False); "
            f"--peer-cpu runs the peer on the CPU in float32 without torch.compile (for tests)")


class TorchPeer:
    """`step()` runs one training step and returns its loss (a device tensor); `sync()` waits
    for the device."""

    def __init__(self, params, cfg: Config, batch: dict, compile: bool | None = None):
        import torch
        import torch.nn.functional as F
        import transformers

        from lmsys.interop import save_hf

        self.cuda = torch.cuda.is_available()
        device = "cuda" if self.cuda else "cpu"
        from lmsys.models import llama

        need = 4.4 * llama.count_params(cfg.model)  # float32 safetensors, with room
        shm = "/dev/shm"  # no disk round trip where there is room (containers often have 64 MB)
        shm = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > need else None
        with tempfile.TemporaryDirectory(dir=shm) as directory:
            save_hf(params, cfg.model, directory, dtype="float32")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, attn_implementation="sdpa")
        model = model.to(device).train()
        model.config.use_cache = False
        if cfg.remat != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        self.autocast = (torch.bfloat16 if cfg.dtype == "bfloat16" else
                         torch.float16 if cfg.dtype == "float16" else None) if self.cuda else None
        o = cfg.optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                     weight_decay=o.weight_decay, **({"fused": True} if self.cuda else {}))
        self.clip = o.clip_norm
        self.batch = [torch.from_numpy(np.asarray(batch[k])).to(device)
                      for k in ("tokens", "positions", "targets", "loss_mask")]
        self.batch = [x.long() if x.dtype == torch.int32 else x for x in self.batch]
        autocast = self.autocast

        def loss_fn(tokens, positions, targets, mask):
            if autocast is not None:
                with torch.autocast("cuda", dtype=autocast):
                    logits = model(input_ids=tokens, position_ids=positions).logits
            else:
                logits = model(input_ids=tokens, position_ids=positions).logits
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            return (ce * mask.flatten()).sum() / mask.sum()

        self.compiled = self.cuda if compile is None else compile
        self.loss_fn = torch.compile(loss_fn) if self.compiled else loss_fn
        self.description = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                            f"{type(model).__name__} on {device}"
                            + (f" ({torch.cuda.get_device_name()})" if self.cuda else "")
                            + f", {'bf16 autocast' if autocast == torch.bfloat16 else str(autocast or 'float32')}"
                            + f", sdpa, {'torch.compile' if self.compiled else 'eager'}, "
                            + f"{'fused ' if self.cuda else ''}AdamW"
                            + (", per-layer gradient checkpointing" if cfg.remat != "none" else ""))

    def step(self):
        import torch

        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(*self.batch)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        return loss.detach()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def peak_memory(self) -> int | None:
        if not self.cuda:
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())
