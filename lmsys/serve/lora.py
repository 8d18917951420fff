"""Many LoRA adapters served on one base: a bank of adapter slots beside the base weights.

    bank = AdapterBank(model, {"code": adapters_a, "chat": adapters_b}, max_loras=4)
    engine = Engine(params, model, tokenizer, config, adapters=bank)
    engine.add_request(ids, GenerationOptions(adapter="code"))      # "" = the base

The bank stacks every adapter's A and B over a slot axis, zero-padded to one rank and one set of
targets (zeros add nothing: a smaller adapter computes exactly its own term), with slot 0 all
zeros (the base):

    params["layers"]["lora"] = {"wq": {"a": [L, S, D, r], "b": [L, S, r, N, H]}, ..., "scale": [L, S]}

A prefill or decode call carries each row's slot (`rows` [B]); the model's base matmul is shared
by all rows and each row adds its own adapter's low-rank term, gathered by slot
(lmsys.models.lora.add), so rows of different adapters run in the same step. The bank's shapes
are fixed when the engine starts (S = max_loras + 1 slots, the rank of the largest adapter), so
which adapters run, and `set_adapter` putting a new adapter into a slot, never recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.models import llama, lora


def load_adapter(path: str, model):
    """The adapters of a LoRA run directory (lmsys train with lora.rank > 0) or of a PEFT
    adapter directory, as a lmsys adapters tree with its scale; the model shapes must match."""
    from pathlib import Path

    from lmsys.checkpoint import CheckpointError, check_model

    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        from lmsys.interop.peft import load_peft

        return load_peft(p, model)[0]
    if not (p / "config.yaml").is_file():
        raise CheckpointError(f"--lora {path}: not a LoRA run directory (config.yaml) nor a PEFT adapter "
                              f"directory (adapter_config.json)")
    from lmsys.config import load_config
    from lmsys.train.adapters import attach, load_adapters

    cfg = load_config(p / "config.yaml")
    if not cfg.lora.rank:
        raise CheckpointError(f"--lora {path}: the run has no adapters (lora.rank = 0); serve it as a model")
    check_model(dataclasses.asdict(cfg.model), model, str(p))
    trainable, _ = load_adapters(p, cfg)
    return lora.adapters_of(attach({"layers": {}}, jax.device_get(trainable), cfg))


def adapter_bank(specs: list[str], max_loras: int, model) -> AdapterBank:
    """The bank of `lmsys serve --lora NAME=PATH ...` (PATH: a LoRA run, a PEFT adapter directory
    or a registered LoRA run models:/NAME@ALIAS)."""
    from lmsys.config import ConfigError

    if max_loras < 0:
        raise ConfigError(f"--max-loras {max_loras}: must be >= 0 (0 = the number of --lora)")
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora {spec!r}: expected NAME=PATH (e.g. code=runs/lora)")
        if name in adapters:
            raise ConfigError(f"--lora {spec!r}: the name {name!r} is given twice")
        if path.startswith("models:/"):
            from lmsys.checkpoint import open_model

            path = str(open_model(path).path)
        adapters[name] = load_adapter(path, model)
    if max_loras and len(adapters) > max_loras:
        raise ConfigError(f"--max-loras {max_loras}: {len(adapters)} adapters given with --lora; raise it")
    return AdapterBank(model, adapters, max_loras)


def _rank(adapters) -> int:
    return max(v["a"].shape[-1] for w, v in adapters.items() if w not in lora.EXTRA)


class AdapterBank:
    """Named adapters in the slots 1..max_loras of fixed-shape stacked arrays (slot 0: none)."""

    def __init__(self, model, adapters: dict[str, dict], max_loras: int = 0, rank: int = 0):
        max_loras = max_loras or len(adapters)
        if len(adapters) > max_loras:
            raise ValueError(f"{len(adapters)} adapters do not fit --max-loras {max_loras}; raise it")
        self.model, self.slots = model, max_loras + 1
        self.rank = max([rank, *(_rank(a) for a in adapters.values())]) or 8
        self.targets = sorted({w for a in adapters.values() for w in a if w not in lora.EXTRA}) or ["wq", "wv"]
        layer_specs = llama.param_specs(model)["layers"]
        self.names: dict[str, int] = {}
        self.arrays = {}
        for w in self.targets:
            base = layer_specs[w]
            k = 1 + lora.IN_DIMS[w]
            self.arrays[w] = {"a": np.zeros((base.shape[0], self.slots, *base.shape[1:k], self.rank), np.float32),
                              "b": np.zeros((base.shape[0], self.slots, self.rank, *base.shape[k:]), np.float32)}
        self.arrays["scale"] = np.zeros((model.n_layers, self.slots), np.float32)
        for name, a in adapters.items():
            self._write(len(self.names) + 1, a)
            self.names[name] = len(self.names) + 1

    def _write(self, slot: int, adapters: dict) -> None:
        extra = [w for w in adapters if w not in lora.EXTRA and w not in self.targets]
        if extra or _rank(adapters) > self.rank:
            raise ValueError(f"the adapter's targets {sorted(extra)} or rank {_rank(adapters)} exceed the bank's "
                             f"({self.targets}, rank {self.rank}) fixed at start-up")
        for w in self.targets:
            for ab in "ab":
                self.arrays[w][ab][:, slot] = 0
            if w in adapters:
                a, b = np.asarray(adapters[w]["a"]), np.asarray(adapters[w]["b"])
                r = a.shape[-1]
                self.arrays[w]["a"][:, slot, ..., :r] = a
                self.arrays[w]["b"][:, slot, :r] = b
        self.arrays["scale"][:, slot] = np.asarray(adapters["scale"])

    def slot(self, name: str) -> int:
        """The slot of adapter `name` ("" = the base, slot 0); KeyError for an unknown name."""
        return 0 if not name else self.names[name]

    def axes(self) -> dict:
        """Logical axes of the bank's arrays (A and B split like their base matrix's dims)."""
        base = llama.param_axes(self.model)["layers"]
        out = {}
        for w in self.targets:
            k = 1 + lora.IN_DIMS[w]
            out[w] = {"a": (base[w][0], None, *base[w][1:k], None), "b": (base[w][0], None, None, *base[w][k:])}
        out["scale"] = ("layers", None)
        return out

    def device_arrays(self, rules=None, dtype=jnp.float32) -> dict:
        """The bank on the devices (laid out by `rules`' table)."""
        arrays = jax.tree.map(lambda x: x.astype(dtype), self.arrays)
        if rules is None:
            return jax.device_put(arrays)
        shardings = jax.tree.map(lambda a, x: rules.sharding(a, x.shape), self.axes(), arrays,
                                 is_leaf=lambda t: isinstance(t, tuple))
        return jax.device_put(arrays, shardings)

    def set_adapter(self, params: dict, name: str, adapters: dict, rules=None) -> dict:
        """`params` whose bank holds `adapters` as `name` (its slot reused, else a free one); the
        shapes stay: nothing recompiles."""
        slot = self.names.get(name) or next((s for s in range(1, self.slots) if s not in self.names.values()), None)
        if slot is None:
            raise ValueError(f"all {self.slots - 1} adapter slots are taken (--max-loras)")
        self._write(slot, adapters)
        self.names[name] = slot
        bank = lora.adapters_of(params)
        arrays = self.device_arrays(rules, jax.tree.leaves(bank)[0].dtype)
        return lora.with_adapters(params, arrays)


def with_rows(params: dict, adapter_B) -> dict:
    """`params` whose adapter bank (if any) applies slot adapter_B[b] to row b (inside a call)."""
    bank = lora.adapters_of(params)
    if bank is None or adapter_B is None:
        return params
    L = bank["scale"].shape[0]
    return lora.with_adapters(params, {**bank, "rows": jnp.broadcast_to(adapter_B, (L, *adapter_B.shape))})
