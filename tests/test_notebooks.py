"""The notebooks run from top to bottom on CPU, without errors, and draw their figures."""
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name, min_figures", [("segment_everything_tour.ipynb", 3)])
def test_notebook_executes(name, min_figures, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.delenv("MOBILESAM_SE_CHECKPOINT", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Which interpreter runs the kernel: jupyter_client maps a kernelspec's "python" to sys.executable.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) >= min_figures, f"{len(figures)} figures"
    kernel_python = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)
    # the evaluation table was printed
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "AMG output" in text and "ECE" in text
