"""Several runs one after another in one torchrun launch, for tests that compare runs of the
same world size: each is a dist_train.fit of CONFIG with its overrides, in the one process
group, so the comparison pays torchrun's start and the workers' imports (seconds each) once.
A run that resumes another is left to a launch of its own: a resume must start from a fresh
process, not from what an earlier run in this one left behind.

    torchrun --standalone --nproc-per-node N tests/runs_worker.py SPEC_JSON

SPEC_JSON: {"config": PATH, "runs": [{"name": NAME, "overrides": ["key=value", ...]}, ...]}.
Rank 0 prints `=== run NAME` before each run's own output (conftest.launch_runs splits on it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dist_train
from dist_train.distributed import process_group

MARKER = "=== run "


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    with process_group() as env:
        for run in spec["runs"]:
            if env.is_main:
                print(MARKER + run["name"], flush=True)
            dist_train.fit(spec["config"], run["overrides"])


if __name__ == "__main__":
    main(sys.argv[1])
