"""``train.profile_steps``: torch.profiler over a window of training steps."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    """torch.profiler over steps [start, end); writes a Chrome/Perfetto trace per rank, and beside it a table of the
    operators that took the most time (on the GPU where there is one), readable without a trace viewer."""

    def __init__(self, steps: tuple[int, int], out: Path, rank: int, device: torch.device, first: int):
        start, end = steps
        if start < first < end:  # resumed inside the window: the rest of it
            start = first
        elif start < end <= first and rank == 0:
            log.warning("train.profile_steps %s lies before step %d, where this run resumes: nothing is traced",
                        list(steps), first)
        self.start, self.end, self.path, self.prof = start, end, out / f"trace_rank{rank}_steps{start}-{end}.json", None
        self.activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def at(self, step: int) -> None:
        if step == self.start and self.end > self.start:
            self.prof = torch.profiler.profile(activities=self.activities, record_shapes=True, with_stack=False)
            self.prof.start()
        if step == self.end and self.prof is not None:
            self.prof.stop()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.path))
            by = "self_device_time_total" if len(self.activities) > 1 else "self_cpu_time_total"
            table = self.path.with_name(self.path.stem.replace("trace", "ops", 1) + ".txt")
            table.write_text(self.prof.key_averages().table(sort_by=by, row_limit=40, max_name_column_width=60) + "\n")
            log.info("profiler trace written to %s (open it in https://ui.perfetto.dev), top operators to %s",
                     self.path, table.name)
            self.prof = None
