"""``pico-vllm launch``: MLX's ``mlx.launch`` with an exit status that tells the truth.

``mlx.launch`` (MLX 0.32) starts the ranks, stops the others when one fails, and then exits 0
whatever happened: a supervisor or a CI job sees success. This runs it unchanged (every argument
is passed on), relays its output, and exits with the exit code of the first rank that failed (1
if it was killed), 0 only when every rank succeeded.
"""

from __future__ import annotations

import re
import subprocess
import sys

# How mlx.launch reports a rank that did not succeed (its log line, colours aside).
RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def launch(argv: list[str]) -> int:
    """Run ``mlx.launch argv``; returns the first failed rank's exit code, else its own."""
    command = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; "
               "sys.exit(main())", *argv]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    first_failure = None
    for line in process.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        failed = RANK_FAILED.search(line)
        if failed and first_failure is None:
            code = int(failed.group(2)) if failed.group(2) is not None else 1
            first_failure = code if code > 0 else 1  # a signal (-15) or a kill: 1
            print(f"[pico-vllm] rank {failed.group(1)} failed: exiting {first_failure}", file=sys.stderr)
    returncode = process.wait()
    return first_failure if first_failure is not None else returncode
