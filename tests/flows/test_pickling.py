"""Every task and flow the runners send to workers pickles: by reference, and with its modules by value.

A Dask (or processes) worker receives the task, and the flow in the task's context, through cloudpickle. A
module-level `threading.Lock` reached from them made `fiqa anchors` and `score` fail on a real Dask
cluster with "cannot pickle '_thread.lock' object" (the per-process model locks are ProcessLock now).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

import flows

ROOT = Path(__file__).resolve().parents[2]
# The pipeline modules that hold a per-process lock: pickled by value, their globals travel with them.
LOCK_MODULES = ("pipeline.anchors_embed", "pipeline.anchors_passes", "pipeline.scoring",
                "pipeline.attribute_training.crops", "pipeline.labellers.registry", "pipeline.process_lock")


def _submitted() -> list[tuple[str, object]]:
    """(module.name, object) of every Prefect task and flow defined in flows/."""
    from prefect import Flow, Task

    found = []
    for info in pkgutil.iter_modules(flows.__path__):
        mod = importlib.import_module(f"flows.{info.name}")
        found += [(f"{mod.__name__}.{k}", v) for k, v in vars(mod).items()
                  if isinstance(v, Flow | Task) and v.fn.__module__ == mod.__name__]
    return sorted(found, key=lambda kv: kv[0])


def test_every_task_and_flow_pickles_also_with_its_modules_by_value():
    objs = _submitted()
    names = {n for n, _ in objs}
    assert {"flows.anchors.anchors_run", "flows.anchors.embed_shard", "flows.ingest.ingest_shard",
            "flows.label.label_shard", "flows.score.score_shard", "flows.scheduled.refresh_dataset"} <= names
    failed = []
    for name, obj in objs:
        by_value = [importlib.import_module(m) for m in (name.rsplit(".", 1)[0], *LOCK_MODULES)]
        for by_val in (False, True):
            for m in by_value if by_val else ():
                cloudpickle.register_pickle_by_value(m)
            try:
                cloudpickle.dumps(obj)
            except Exception as e:  # noqa: BLE001 - collected and reported together
                failed.append(f"{name} (modules by value: {by_val}): {type(e).__name__}: {e}")
            finally:
                for m in by_value if by_val else ():
                    cloudpickle.unregister_pickle_by_value(m)
    assert not failed, "\n".join(failed)


def test_process_lock_pickles_as_a_fresh_lock_and_serialises_its_users():
    import threading

    from pipeline.process_lock import ProcessLock

    lock = ProcessLock()
    with lock:
        copy = cloudpickle.loads(cloudpickle.dumps(lock))
        with copy:  # a fresh lock: not held by the original's holder
            pass
    held = []

    def hold():
        with lock:
            held.append(threading.get_ident())

    threads = [threading.Thread(target=hold) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 8
    reentrant = ProcessLock(reentrant=True)
    with reentrant, reentrant:
        pass


@pytest.mark.slow
def test_tasks_and_flows_load_back_in_a_fresh_worker_process(tmp_path):
    blob = tmp_path / "objs.pkl"
    blob.write_bytes(cloudpickle.dumps({n: o for n, o in _submitted()}))
    code = ("import sys, cloudpickle; objs = cloudpickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(sorted(type(o).__name__ for o in objs.values()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, str(blob)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Flow" in out.stdout and "Task" in out.stdout
