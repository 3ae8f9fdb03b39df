"""The notebooks run top to bottom, headless, on the real model with a tiny token budget.

A cell that raises fails the test (nbclient raises CellExecutionError). The kernel inherits
this process's environment: FLAXSTREAM_NOTEBOOK_TOKENS keeps generation short.
"""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
TOKENS = "6"


def _run(name: str, monkeypatch) -> nbformat.NotebookNode:
  monkeypatch.setenv("FLAXSTREAM_NOTEBOOK_TOKENS", TOKENS)
  # The kernel imports the project from this checkout even when it is not pip-installed.
  path = os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH")]))
  monkeypatch.setenv("PYTHONPATH", path)
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return nb


def _outputs(nb, output_type=None):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if output_type is None or o.output_type == output_type]


def _text(nb) -> str:
  return "".join(o.get("text", "") for o in _outputs(nb, "stream"))


@pytest.mark.parametrize("name", ["sampling_explorer.ipynb", "quickstart.ipynb"])
def test_stored_without_outputs_and_parametrized(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and "FLAXSTREAM_NOTEBOOK_TOKENS" in params[0].source


@pytest.mark.slow
def test_sampling_explorer_runs(monkeypatch):
  nb = _run("sampling_explorer.ipynb", monkeypatch)
  assert not _outputs(nb, "error")
  pngs = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # the filtered distributions and the entropy plot
  html = "".join(o["data"].get("text/html", "") for o in _outputs(nb, "display_data"))
  assert "logprob" in html and "<table>" in html  # coloured text, side-by-side table
  assert "finish_reason=" in _text(nb) and "reproduced" in _text(nb)


@pytest.mark.slow
def test_quickstart_runs(monkeypatch):
  nb = _run("quickstart.ipynb", monkeypatch)
  assert not _outputs(nb, "error")
  text = _text(nb)
  assert "already installed" in text  # the install cell is a no-op here
  assert "backend: cpu" in text and "Mesh(" in text
  assert f"| {TOKENS} tokens |" in text
  # The server demo either ran to the end or said clearly why it could not.
  assert ("server stopped" in text and "finish_reason=" in text) or "server demo skipped" in text
