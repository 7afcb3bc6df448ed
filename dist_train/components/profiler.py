"""logging.profile: torch.profiler over a window of optimizer steps, on the chosen ranks.

Each profiling rank writes RUN_DIR/profile/trace_rank{R}_steps{A}-{B}.json (Chrome trace
format: chrome://tracing or https://ui.perfetto.dev open it) and top_ops_rank{R}.txt, the
operators that took the most time (self time: each operator's own, not its children's), on the
GPU where there is one. The window is optimizer steps start_step+1 .. start_step+steps, data
loading, forward, backward, the optimizer and any collective included; logging and evaluation
inside it are in the trace too. A run resumed past the window does not profile again; one that
ends inside it writes what it has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.components.base import Component
from dist_train.config import ProfileConfig


class Profiler(Component):
    name = "profile"

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, start_step: int) -> None:
        self.cfg, self.rank, self.first_step = cfg, rank, start_step + 1  # this invocation's first step
        self.start, self.end = cfg.start_step, cfg.start_step + cfg.steps
        self.out = run_dir / "profile"
        self.active: torch.profiler.profile | None = None
        self.marker: torch.profiler.record_function | None = None  # the step being profiled
        self.notes = [f"profile: steps {self.start + 1}-{self.end} on rank(s) {cfg.ranks}, into {self.out}/"]

    def on_start(self, run) -> None:
        if self.first_step == self.start + 1:  # the window begins with this invocation's first step
            self._begin(run)

    def after_step(self, run, step: int) -> None:
        if step == self.start:
            self._begin(run)
        elif self.active is not None:
            if step == self.end:
                self._write(run, step)
            else:
                self._mark(step + 1)

    def at_end(self, run, step: int) -> None:
        if self.active is not None:  # the run ended inside the window
            self._write(run, step)

    def _begin(self, run) -> None:
        if self.rank not in self.cfg.ranks:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if run.env.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.active = torch.profiler.profile(activities=activities, record_shapes=True)
        self.active.start()
        self._mark(self.start + 1)

    def _mark(self, step: int) -> None:
        """Close the last step's annotation and open the next's (ProfilerStep#N in the trace)."""
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
        self.marker = torch.profiler.record_function(f"ProfilerStep#{step}")
        self.marker.__enter__()

    def _write(self, run, step: int) -> None:
        self.marker.__exit__(None, None, None)
        profile, self.active, self.marker = self.active, None, None
        profile.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace_rank{self.rank}_steps{self.start + 1}-{step}.json"
        profile.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if run.env.device.type == "cuda" else "self_cpu_time_total"
        table = profile.key_averages().table(sort_by=sort_by, row_limit=25)
        (self.out / f"top_ops_rank{self.rank}.txt").write_text(table + "\n")
        run.logger.message(f"profile of steps {self.start + 1}-{step} on rank {self.rank}: {trace}")
