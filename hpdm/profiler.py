"""``train.profile_steps``: torch.profiler over a window of training steps."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    """torch.profiler over steps [start, end), numbered as in the logs (the first step is 1); writes a
    Chrome/Perfetto trace per rank, in which each step is a ``step N`` range, and beside it a table of the operators
    that took the most time (on the GPU where there is one), readable without a trace viewer."""

    def __init__(self, steps: tuple[int, int], out: Path, rank: int, device: torch.device, first: int):
        start, end = max(steps[0], first + 1), steps[1]  # resumed at step `first`: the rest of the window
        if start >= end and steps[0] < end and rank == 0:
            log.warning("train.profile_steps %s lies before step %d, where this run resumes: nothing is traced",
                        list(steps), first + 1)
        self.start, self.end, self.path = start, end, out / f"trace_rank{rank}_steps{start}-{end}.json"
        self.activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = self.label = None

    def at(self, step: int) -> None:
        """Called before step ``step`` runs."""
        self._end_label()
        if step >= self.end:
            self.finish()
        elif step == self.start:
            self.prof = torch.profiler.profile(activities=self.activities, record_shapes=True, with_stack=False)
            self.prof.start()
        if self.prof is not None:
            self.label = torch.profiler.record_function(f"step {step}")
            self.label.__enter__()

    def finish(self) -> None:
        """Write what was traced (the whole window, or up to a preemption inside it)."""
        if self.prof is None:
            return
        self._end_label()
        self.prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        by = "self_device_time_total" if len(self.activities) > 1 else "self_cpu_time_total"
        table = self.path.with_name(self.path.stem.replace("trace", "ops", 1) + ".txt")
        table.write_text(self.prof.key_averages().table(sort_by=by, row_limit=40, max_name_column_width=60) + "\n")
        log.info("profiler trace written to %s (open it in https://ui.perfetto.dev), top operators to %s",
                 self.path, table.name)
        self.prof = None

    def _end_label(self) -> None:
        if self.label is not None:
            self.label.__exit__(None, None, None)
            self.label = None
