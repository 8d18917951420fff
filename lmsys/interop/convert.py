"""`lmsys convert`: whole model directories between Hugging Face and lmsys.

    hf_to_lmsys("hf/", "out/llama")        # an lmsys run directory at step 0 (config.yaml + checkpoints/)
    lmsys_to_hf("runs/tiny", "out/hf")     # an HF directory transformers loads as-is
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lmsys.data.tokenizer import copy_tokenizer_files
from lmsys.interop.hf import load_hf, save_hf
from lmsys.interop.hf_config import ConversionError, config_from_hf, read_hf_config

# Kept beside an lmsys checkpoint written by `lmsys convert from-hf`, so `to-hf` can restore the
# fields lmsys does not model (max_position_embeddings, bos/eos ids).
SOURCE_CONFIG = "hf_config.json"


def hf_to_lmsys(hf_dir: str | Path, out_dir: str | Path, rules=None) -> Path:
    """`lmsys convert from-hf`: an lmsys checkpoint directory (config.yaml, checkpoints/ at step
    0, the tokenizer files, and the source config as hf_config.json) that `lmsys generate` and
    `lmsys serve` load like a training run."""
    from lmsys.checkpoint import Checkpointer, make_meta
    from lmsys.config import MeshConfig, from_dict, save_config
    from lmsys.models import llama
    from lmsys.parallel import Rules, build_mesh

    hf_dir, out = Path(hf_dir), Path(out_dir).absolute()
    hf_config = read_hf_config(hf_dir)
    model = config_from_hf(hf_config)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ConversionError(f"{out} already holds checkpoints; choose a new output directory")
    rules = rules or Rules(build_mesh(MeshConfig()))
    shardings = rules.tree_shardings(llama.param_axes(model), llama.param_shapes(model))
    params, model = load_hf(hf_dir, shardings)
    out.mkdir(parents=True, exist_ok=True)
    copied = copy_tokenizer_files(hf_dir, out)
    if "tokenizer.json" not in copied:
        print(f"warning: {hf_dir} has no tokenizer.json; put one in {out} before generating")
    (out / SOURCE_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    cfg = from_dict({"model": dataclasses.asdict(model),
                     "data": {"tokenizer": str(out / "tokenizer.json")},
                     "run_dir": str(out)})
    save_config(cfg, out / "config.yaml")
    ckpt = Checkpointer(out / "checkpoints", keep=1, async_save=False)
    try:
        ckpt.save(0, {"params": params}, make_meta(0, 0, model, rules.mesh))
    finally:
        ckpt.close()
    return out


def lmsys_to_hf(src: str | Path, out_dir: str | Path, dtype: str = "float32", step: int | None = None,
                max_shard_size: int = 5 * 2**30, rules=None, merge: bool = False) -> Path:
    """`lmsys convert to-hf`: an HF directory from any model `lmsys.checkpoint.open_model` reads
    (a training run directory, the output of `convert from-hf`, a registered `models:/` model),
    with its tokenizer files; the source's hf_config.json (from `convert from-hf`) restores the
    fields lmsys does not model. A LoRA run gives a PEFT adapter directory
    (lmsys.interop.peft), or with `merge` the full weights with its adapters merged in (as does a
    PEFT adapter directory, which needs `merge`)."""
    from lmsys.checkpoint import open_model
    from lmsys.config import MeshConfig
    from lmsys.data.tokenizer import BUILTIN
    from lmsys.parallel import Rules, build_mesh

    found = open_model(src)
    if merge and not (found.kind == "peft" or found.config.lora.rank):
        raise ConversionError(f"{src} has no LoRA adapters: --merge merges those of a LoRA run or a PEFT "
                              f"adapter directory into its base; leave it out")
    if found.kind == "peft" and not merge:
        raise ConversionError(f"{src} is a PEFT adapter directory already; --merge writes its base with "
                              f"the adapter merged in")
    if found.config.lora.rank and not merge:
        from lmsys.interop.peft import export_lora_run

        return export_lora_run(found, out_dir, step)
    tok_spec = found.config.data.tokenizer
    if tok_spec != BUILTIN and not Path(tok_spec).is_file():
        raise ConversionError(f"tokenizer {tok_spec!r} of {found.ref} does not exist; copy its "
                              f"tokenizer.json into {found.path}")
    params, _ = found.params(rules or Rules(build_mesh(MeshConfig())), step)
    base = found.hf_config
    if (found.path / SOURCE_CONFIG).is_file():
        base = json.loads((found.path / SOURCE_CONFIG).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tok_spec == BUILTIN:  # the trained BPE: write its tokenizer.json
        found.tokenizer().save(str(out / "tokenizer.json"))
        _write_tokenizer_config(out)
        tok_dir = out
    else:
        tok_dir = Path(tok_spec).parent
    save_hf(params, found.config.model, out, tokenizer_dir=tok_dir, dtype=dtype,
            max_shard_size=max_shard_size, base_config=base)
    if not (out / "tokenizer_config.json").is_file() and (out / "tokenizer.json").is_file():
        _write_tokenizer_config(out)
    return out


def _write_tokenizer_config(out: Path) -> None:
    """A minimal tokenizer_config.json so `transformers.AutoTokenizer` loads tokenizer.json."""
    from tokenizers import Tokenizer

    from lmsys.data.tokenizer import EOS_CANDIDATES, PAD_CANDIDATES, first_token_id

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    eos = first_token_id(tok, EOS_CANDIDATES)
    if eos is not None:
        conf["eos_token"] = tok.id_to_token(eos)
    pad = first_token_id(tok, PAD_CANDIDATES)
    if pad is not None:
        conf["pad_token"] = tok.id_to_token(pad)
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
