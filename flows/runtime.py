"""The sharded-flow template: the one owner of a run's lifecycle and of its shard commits.

Like an executor owns its ranks, the runtime starts (or resumes) a run, refuses changed parameters
on resume, skips committed shards, submits one task per remaining shard to the flow's task runner
(or runs an in-flow step shard by shard), and writes a shard's commit record only after its work has
returned; tasks and steps only compute and write. A failed shard fails the run, which resumes with
the same run id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from data_manifest import Workspace, catalog, commits, runs
from flows import runners
from flows.bookkeeping import publish_run_report, run_log, watch_temporary_server
from pipeline import cluster
from pipeline.progress import Progress

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Split items into consecutive shards of at most `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass
class ShardOutcome:
    shard: str
    skipped: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _marker(stage: str | None, name: str) -> str:
    """A shard's commit record: ``<stage>-<name>``, or ``<name>`` for a flow of one stage."""
    return f"{stage}-{name}" if stage else name


def run_shards(task: Any, shards: Mapping[str, Any], *, ws: Workspace, run_id: str, desc: str,
               stage: str | None = None, progress: bool | None = None, **kwargs: Any) -> list[ShardOutcome]:
    """Submit task(ws_root, run_id, name, payload, **kwargs) per shard not yet committed; mark each done here.

    A commit is recorded only after its task returned and its files are verified; failures go to check_shard_failures.
    """
    outcomes: list[ShardOutcome] = []
    pending = {}
    client = runners.dask_client()  # None unless a Dask cluster runs the shards
    commits.expect_shards(ws, run_id)  # what a task checks it sees before it writes
    with runners.shared_api(client):
        for name, payload in shards.items():
            if runs.shard_done(ws, run_id, _marker(stage, name)):
                outcomes.append(ShardOutcome(name, skipped=True))
                continue
            pending[task.submit(ws.location, run_id, name, payload, **kwargs)] = name
        run_log("run %s: %d shard(s), %d already committed", run_id, len(shards), len(outcomes))
        bar = Progress(len(shards), desc, progress)
        bar.update(len(outcomes))
        finished: set[Any] = set()
        try:
            for fut in cluster.as_completed(list(pending), cluster.WorkerWatch(client).lost if client else None):
                name = pending[fut]
                finished.add(fut)
                try:
                    counts, worker = commits.verified(ws, fut.result())  # its files are here, as the worker wrote
                    runs.mark_shard_done(ws, run_id, _marker(stage, name), counts, worker)
                except Exception as e:  # noqa: BLE001 - a failed shard is recorded and the run goes on
                    outcomes.append(ShardOutcome(name, error=f"{type(e).__name__}: {e}"))
                    run_log("shard %s of run %s failed: %s", name, run_id, outcomes[-1].error, level=40)
                else:
                    outcomes.append(ShardOutcome(name, counts=counts))
                    run_log("shard %s of run %s committed: %s", name, run_id, counts)
                bar.update()
        except cluster.ClusterLost as e:  # the shards not finished fail: the run resumes with the same run id
            outcomes += [ShardOutcome(n, error=f"ClusterLost: {e}") for f, n in pending.items() if f not in finished]
        finally:
            bar.close()
    return sorted(outcomes, key=lambda o: o.shard)


def run_steps(step: Callable[[str, Any], dict[str, Any] | None], shards: Mapping[str, Any], *, ws: Workspace,
              run_id: str, stage: str | None = None, desc: str | None = None, progress: bool | None = False,
              redo: Callable[[str], bool] | None = None) -> list[ShardOutcome]:
    """Run step(name, payload) in the flow's process, in shard order, per shard not yet committed; mark each done.

    For the passes that need the whole run's state (a search over every center, a global min/max): a
    failure stops the run at once. `redo(name)` may ask for a committed shard to run again (its output is
    missing).
    """
    outcomes: list[ShardOutcome] = []
    bar = Progress(len(shards), desc or stage or "steps", progress)
    try:
        for name, payload in shards.items():
            if runs.shard_done(ws, run_id, _marker(stage, name)) and not (redo and redo(name)):
                outcomes.append(ShardOutcome(name, skipped=True))
            else:
                counts = step(name, payload) or {}
                runs.mark_shard_done(ws, run_id, _marker(stage, name), counts)
                run_log("step %s of run %s committed: %s", _marker(stage, name), run_id, counts)
                outcomes.append(ShardOutcome(name, counts=counts))
            bar.update()
    finally:
        bar.close()
    return outcomes


def summarize(outcomes: Sequence[ShardOutcome]) -> dict[str, Any]:
    """Totals over shards: done, skipped, failed, and summed counts."""
    total: dict[str, Any] = {"shards": len(outcomes), "skipped_shards": sum(o.skipped for o in outcomes),
                             "failed_shards": sum(o.error is not None for o in outcomes)}
    for o in outcomes:
        for k, v in o.counts.items():
            if isinstance(v, int | float):
                total[k] = total.get(k, 0) + v
    return total


class ShardFailures(RuntimeError):
    """Some shards failed; the run is recorded as failed and can be resumed with the same run id."""


def check_shard_failures(outcomes: Sequence[ShardOutcome], run_id: str) -> None:
    """Raise ShardFailures naming the first failed shards, if any failed."""
    failed = [o for o in outcomes if o.error]
    if failed:
        lines = "; ".join(f"shard {o.shard}: {o.error}" for o in failed[:5])
        raise ShardFailures(f"{len(failed)} of {len(outcomes)} shards failed in run {run_id} ({lines}); "
                            f"re-run with --run-id {run_id} to resume")


@contextlib.contextmanager
def tracked_run(ws: Workspace, flow_name: str, params: dict[str, Any], run_id: str | None = None,
                decisive: dict[str, Any] | None = None) -> Iterator[dict]:
    """Start (or resume) a run under its run lock, yield a dict for metrics, finish it and refresh the catalog.

    Exceptions mark the run failed and propagate; the catalog is refreshed either way. Before anything is
    recorded, a run id that another live process is running raises runs.RunLocked, and a resume whose
    `decisive` parameters (when given) differ from the first attempt's raises ValueError.
    """
    watch_temporary_server()
    with runs.run_lock(ws, run_id or runs.new_run_id(flow_name)) as lock:
        runs.check_resume(ws, run_id, decisive or {})
        rid = runs.start_run(ws, flow_name, params, lock.parent.name)
        state: dict[str, Any] = {"run_id": rid, "metrics": {}, "counts": None}
        try:
            yield state
        except BaseException as e:
            # Stopped by a signal (the watchdog after its parent died, a cancelled serve): crashed, so resumable.
            from prefect.exceptions import TerminationSignal

            status = runs.CRASHED if isinstance(e, TerminationSignal | KeyboardInterrupt) else runs.FAILED
            runs.finish_run(ws, rid, status, counts=state["counts"], metrics=state["metrics"],
                            error=f"{type(e).__name__}: {e}")
            run_log("%s run %s %s: %s: %s; counts %s", flow_name, rid, status, type(e).__name__, e, state["counts"])
            catalog.refresh(ws)
            publish_run_report(ws, rid)
            raise
        runs.finish_run(ws, rid, runs.COMPLETED, counts=state["counts"], metrics=state["metrics"])
        run_log("%s run %s completed: counts %s; metrics %s", flow_name, rid, state["counts"], state["metrics"])
        catalog.refresh(ws)
        publish_run_report(ws, rid)
