"""The profile.* keys: `lmsys train` writes a JAX profiler trace of the chosen steps; bad values
fail naming the key."""

import pytest

from lmsys.config import ConfigError
from lmsys.train import train
from lmsys.train.profile import profile_dir
from tests.common import tiny_config, write_corpus


def test_profile_steps_write_a_trace(tmp_path):
    source = write_corpus(tmp_path / "corpus", n_docs=10)
    cfg = tiny_config({"fsdp": 1, "data": 1}, steps=3, run_dir=str(tmp_path / "run"),
                      data={"source": source, "cache_dir": str(tmp_path / "cache")},
                      profile={"steps": 2, "start_step": 2}, checkpoint={"every": 0},
                      model={"vocab_size": 512})
    history = train(cfg, progress=False, devices=__import__("jax").devices()[:1])
    assert [r["step"] for r in history] == [1, 2, 3]  # the trace leaves the run as it was
    traces = sorted(p.name for p in (tmp_path / "run" / "profile").rglob("*") if p.is_file())
    assert any(n.endswith(".xplane.pb") for n in traces), traces
    assert any(n.endswith(".trace.json.gz") for n in traces), traces  # Perfetto / chrome://tracing


def test_profile_dir_default_and_per_process(tmp_path):
    cfg = tiny_config(run_dir=str(tmp_path / "r"), steps=5, profile={"steps": 1})
    assert profile_dir(cfg, 0, 1) == tmp_path / "r" / "profile"
    assert profile_dir(cfg, 3, 4) == tmp_path / "r" / "profile" / "process_3"
    cfg = tiny_config(steps=5, profile={"steps": 1, "dir": str(tmp_path / "p")})
    assert profile_dir(cfg, 0, 1) == tmp_path / "p"


@pytest.mark.parametrize("profile, key", [
    ({"steps": -1}, "profile.steps"),
    ({"steps": 1, "start_step": 0}, "profile.start_step"),
    ({"steps": 3, "start_step": 9}, "profile.start_step"),  # past steps=10
    ({"steps": 1, "dir": "gs://bucket/trace"}, "profile.dir"),
    ({"step": 1}, "profile.steps"),  # the typo's suggestion
])
def test_bad_profile_values_name_the_key(profile, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(steps=10, profile=profile)
