"""Executes the quickstart notebook headless (as a user would, from its folder), so it cannot
rot; camvid_tradeoff.ipynb trains for minutes and is only checked for valid code."""
import ast
import os

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "experiments", "notebooks")


def _outputs(cell, kind):
  return [o for o in cell.get("outputs", []) if o["output_type"] == kind]


def test_quickstart_runs_top_to_bottom(monkeypatch):
  nb = nbformat.read(os.path.join(NOTEBOOKS, "quickstart.ipynb"), as_version=4)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  if jax.config.jax_compilation_cache_dir:  # reuse the suite's compilation cache
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()   # raises CellExecutionError, with the traceback, if any cell fails
  code = [c for c in nb.cells if c.cell_type == "code"]
  images = [c for c in code if any("image/png" in o.get("data", {})
                                   for o in _outputs(c, "execute_result"))]
  assert len(images) >= 3   # input, the side-by-side figure, figure + labels
  text = "".join(o.get("text", "") for c in code for o in _outputs(c, "stream"))
  assert "tokens instead of 64 patches" in text and "active tokens per stage" in text


def test_camvid_notebook_is_valid_python():
  nb = nbformat.read(os.path.join(NOTEBOOKS, "camvid_tradeoff.ipynb"), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      ast.parse(cell.source)
