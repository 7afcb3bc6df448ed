"""RUN_DIR/metrics.jsonl: one JSON record per logged step, the run's own record of itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_train.logger.base import NoFinish


class MetricsFile(NoFinish):
    def __init__(self, path: Path, resumed_step: int) -> None:
        self.path = path
        # Steps past the resume point (or everything, on a fresh start) will be trained again.
        _drop_lines_after(path, resumed_step)

    def log(self, step: int, metrics: dict[str, Any], walltime: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics, "time": walltime}) + "\n")

    def close(self, exit_code: int) -> None:
        pass


def _drop_lines_after(path: Path, step: int) -> None:
    """On resume, forget metrics of steps that will be trained again, so each step appears once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash mid-write
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
