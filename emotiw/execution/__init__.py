"""Where a stage's per-item work runs: here, in a pool of worker processes, or on a Ray cluster.

A stage splits its work into tasks, calls of one function on argument tuples (preprocess: one per
clip; test: forward passes of a clip; extract: mini-batches of extract_features), and hands them to
an Executor. `Executor.map` calls `function(*arguments, progress=report)` for each, wherever it runs,
and yields (index, result) as each finishes; `report(n)` counts n units done (frames, images) for the
progress bars, which the Executor draws. The stage itself never knows where its tasks ran: a task's
result is the same here, in a worker process or on a Ray node, so the outputs are the same bytes.

It owns what every way of running needs:
- threads: every process runs its share of the cores in the BLAS and OpenCV (limit_threads);
- worker processes (spawned, so each loads Caffe and its nets anew) that die with the main process,
  even a killed one, and leave Ctrl-C to it;
- Ctrl-C and SIGTERM (a `Terminated`): the workers stop at once, the tasks not started are dropped;
- a worker that dies: the pool's run stops with one line; a Ray actor is restarted and its task
  tried again (emotiw.execution.cluster).
"""

from dataclasses import dataclass

from emotiw.errors import UserError
from emotiw.execution.workers import limit_threads, run_in_pool

__all__ = ["Executor", "Progress", "limit_threads"]

@dataclass(frozen=True)
class Progress:
    """The bars of a run: `tasks` names the tasks (a bar of them, e.g. "clips") or is None (no such
    bar); `units` names what `report(n)` counts (e.g. "frames"), `total` their number if known and
    `done` those finished by an earlier run."""
    units: str
    tasks: str | None = None
    total: int | None = None
    done: int = 0


class Executor:
    """`Executor()` runs tasks here, one after the other; `Executor(workers=N)` in N worker processes;
    `Executor(ray=True | "HOST:PORT", needs=paths)` on a Ray cluster (emotiw.execution.cluster), whose
    nodes must all see `needs`. Made before the work starts, so that a bad address fails at once;
    `with executor:` connects to Ray (a no-op otherwise)."""

    def __init__(self, workers=1, ray=None, needs=()):
        if workers < 1:
            raise UserError(f"--workers must be at least 1, not {workers}")
        if ray and workers > 1:
            raise UserError("--ray runs one task per CPU of the cluster; drop --workers")
        self.workers = workers
        self.cluster = None
        if ray:
            from emotiw.execution.cluster import Cluster

            self.cluster = Cluster(ray, needs)

    @property
    def local(self):
        return self.cluster is None

    def __enter__(self):
        if self.cluster is not None:
            self.cluster.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cluster is not None:
            self.cluster.__exit__(*exc)

    def map(self, function, calls, labels, progress):
        """Yields (index, function(*calls[index], progress=...)) as each call finishes: in order here,
        in any order in a pool or on Ray. `labels` name the calls in error messages; `progress` is a
        Progress."""
        from tqdm import tqdm

        task_bar = (tqdm(total=len(calls), desc=progress.tasks, unit=progress.tasks.rstrip("s"), disable=None)
                    if progress.tasks else None)
        unit_bar = tqdm(total=progress.total, initial=progress.done, desc=progress.units,
                        unit=progress.units.rstrip("s"), disable=None)
        try:
            if self.cluster is not None:
                results = self.cluster.run(function, calls, labels, unit_bar.update)
            elif self.workers <= 1 or len(calls) <= 1:
                results = ((index, function(*call, progress=unit_bar.update)) for index, call in enumerate(calls))
            else:
                results = run_in_pool(function, calls, min(self.workers, len(calls)), unit_bar.update)
            for index, result in results:
                if task_bar is not None:
                    task_bar.update()
                yield index, result
        finally:
            unit_bar.close()
            if task_bar is not None:
                task_bar.close()


