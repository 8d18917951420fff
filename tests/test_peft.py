"""PEFT interop: a LoRA run of lmsys exported with `lmsys convert to-hf` loads in
`peft.PeftModel.from_pretrained` with transformers' logits equal to lmsys's; `--merge` writes
full HF weights with the same logits; an adapter made by `peft` (random A and B) loads in lmsys
(as a model reference: its base with the adapter merged in) with peft's logits."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_finetune import _ft_config, hf_dir  # noqa: F401  (the tiny HF Llama fixture)

from lmsys.checkpoint import load_model
from lmsys.cli import main
from lmsys.interop import ConversionError
from lmsys.interop.convert import lmsys_to_hf
from lmsys.models import llama

TOKENS = np.random.default_rng(0).integers(5, 28, (2, 12))


def _lmsys_logits(ref):
    loaded = load_model(ref)
    positions = np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape)
    with jax.default_matmul_precision("highest"):
        return np.asarray(llama.forward(loaded.params, TOKENS, positions, cfg=loaded.config.model)[0])


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def _base(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_run(hf_dir, tmp_path_factory):
    from lmsys.train.loop import train

    tmp = tmp_path_factory.mktemp("lora")
    cfg = _ft_config(hf_dir, tmp, steps=4, optimizer={"lr": 2e-2, "warmup_steps": 0},
                     lora={"rank": 4, "alpha": 8.0, "targets": "all"})
    train(cfg, progress=False)
    return cfg.run_dir


def test_exported_adapter_loads_in_peft_with_lmsys_logits(hf_dir, lora_run, tmp_path):
    out = tmp_path / "adapter"
    assert main(["convert", "to-hf", lora_run, str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, str(hf_dir.absolute()))
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                "up_proj", "v_proj"]
    ours = _lmsys_logits(lora_run)
    base = _base(hf_dir)
    plain = _torch_logits(base)
    assert np.abs(ours - plain).max() > 1e-2  # the adapters change the logits
    theirs = _torch_logits(peft.PeftModel.from_pretrained(base, out))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    merged = tmp_path / "merged"
    assert main(["convert", "to-hf", lora_run, str(merged), "--merge"]) == 0
    np.testing.assert_allclose(_torch_logits(_base(merged)), ours, atol=1e-4, rtol=0)

    with pytest.raises(ConversionError, match="has no LoRA adapters: --merge"):
        lmsys_to_hf(hf_dir, tmp_path / "x", merge=True)
    with pytest.raises(ConversionError, match="is a PEFT adapter directory already"):
        lmsys_to_hf(out, tmp_path / "y")


def test_peft_adapter_loads_in_lmsys_with_peft_logits(hf_dir, tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                             init_lora_weights=False)  # random A and B (B is zero by default)
    model = peft.get_peft_model(_base(hf_dir), config)
    theirs = _torch_logits(model)
    out = tmp_path / "peft_adapter"
    model.save_pretrained(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = str(hf_dir)
    (out / "adapter_config.json").write_text(json.dumps(saved))
    assert np.abs(theirs - _torch_logits(_base(hf_dir))).max() > 1e-2
    np.testing.assert_allclose(_lmsys_logits(out), theirs, atol=1e-4, rtol=0)

    # and back: the merged weights as a Hugging Face model
    assert main(["convert", "to-hf", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    np.testing.assert_allclose(_torch_logits(_base(tmp_path / "merged")), theirs, atol=1e-4, rtol=0)

    saved["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ConversionError, match="use_dora = True is not supported"):
        load_model(out)


def test_lora_flag_loads_runs_and_peft_dirs_and_init_from_takes_an_adapter(hf_dir, lora_run, tmp_path):
    from lmsys.models import lora
    from lmsys.serve.lora import adapter_bank
    from lmsys.train.loop import load_data, resolve_init_from, train
    from lmsys.train.step import loss_sums

    loaded = load_model(hf_dir)
    out = tmp_path / "adapter"
    lmsys_to_hf(lora_run, out)
    bank = adapter_bank([f"run={lora_run}", f"peft={out}"], 0, loaded.config.model)
    assert bank.names == {"run": 1, "peft": 2} and bank.rank == 4
    for slot in (1, 2):  # the bank's slot = the run's adapters, whichever way they came
        slot_adapters = {w: {ab: v[ab][:, slot] for ab in "ab"} if w != "scale" else v[:, slot]
                         for w, v in bank.arrays.items()}
        merged = lora.merge(lora.with_adapters(loaded.params, slot_adapters))
        positions = np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape)
        with jax.default_matmul_precision("highest"):
            logits = np.asarray(llama.forward(merged, TOKENS, positions, cfg=loaded.config.model)[0])
        np.testing.assert_allclose(logits, _lmsys_logits(lora_run), atol=1e-5, rtol=0)

    # init_from a PEFT adapter: a fine-tune starting from its base with the adapter merged in
    cfg = _ft_config(out, tmp_path, steps=1, run_dir=str(tmp_path / "from_adapter"))
    resolved = resolve_init_from(cfg)
    assert resolved.model == loaded.config.model and resolved.init_from == str(out.absolute())
    (h,) = train(cfg, progress=False)
    batch = load_data(resolved).batch(0, cfg.batch_size)
    start = load_model(out)
    logits = llama.forward(start.params, batch["tokens"], batch["positions"], batch["segment_ids"],
                           cfg=resolved.model)[0]
    total, n = loss_sums(logits, batch["targets"], batch["loss_mask"])
    np.testing.assert_allclose(h["loss"], float(total / n), rtol=1e-4)
