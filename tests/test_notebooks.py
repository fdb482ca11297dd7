"""The notebooks run top to bottom (offline, on the CPU) and are stored without outputs.

Each notebook asserts what it shows (block counts, equal tokens, numerics), so a fault in the
code it walks through fails it here. Figures go to a temporary folder, not over the ones the
README shows (``make notebooks-figures`` refreshes those)."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
CELL_LIMIT_S = 300  # a hung cell fails the test instead of hanging CI
FIGURES = {  # what each notebook must save (the README shows them)
    "01_block_manager": ["01_block_manager", "01_fragmentation"],
    "02_scheduler": ["02_scheduler"],
    "03_paged_attention": ["03_paged_attention"],
    "04_model_runner_and_graphs": ["04_model_runner", "04_layer_groups"],
    "05_engine_end_to_end": ["05_sampler", "05_structured_outputs", "05_throughput_latency"],
}


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_five_notebooks_and_they_are_stored_without_outputs():
    assert [p.stem[:2] for p in notebooks()] == ["01", "02", "03", "04", "05"]
    for path in notebooks():
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, \
                    f"{path.name} has outputs: run `make strip-notebooks`"


@pytest.mark.slow
@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PICO_VLLM_FIGURES", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    started = time.monotonic()
    NotebookClient(notebook, timeout=CELL_LIMIT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    print(f"{path.name}: {time.monotonic() - started:.1f} s")
    for name in FIGURES[path.stem]:
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
