"""Remove outputs and execution counts from every notebook here (``make strip-notebooks``): the
notebooks are stored clean, so diffs show code and prose only (a test checks it)."""

from pathlib import Path

import nbformat

for path in sorted(Path(__file__).parent.glob("*.ipynb")):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata = {}
    nbformat.write(notebook, path)
    print(f"stripped {path.name}")
