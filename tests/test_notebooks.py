"""The notebooks run top to bottom (in a fresh kernel, as a user would), and are kept in git
without outputs."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

PLOTS = {"01_quickstart": 1, "02_sharding": 1, "04_finetune_from_hf": 1}  # notebooks that draw figures, and how many
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:4] == ["01_quickstart.ipynb", "02_sharding.ipynb", "03_serving.ipynb",
                                                "04_finetune_from_hf.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs: strip them"
    # as on a laptop: one CPU device unless the notebook asks for more (02 does); the
    # compilation cache of the test suite is shared
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # this checkout's lmsys, whatever (if anything) is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.parents[1]), env.get("PYTHONPATH")]))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute(env=env)
    if path.stem in PLOTS:  # the plots were drawn
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if "image/png" in o.get("data", {})]
        assert len(images) >= PLOTS[path.stem], f"{path.name}: {len(images)} image/png outputs"
