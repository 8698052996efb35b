"""Ray Train's reports to the driver, while ``fit()`` blocks: for progress lines and webhook events.

``RelayCallback`` runs in Train's controller and puts each rank-0 report on a Ray queue (a short RPC; the
controller never waits on a handler). ``ReportRelay`` drains the queue in a driver thread and calls each handler
``(metrics, checkpoint_path)``; on exit it drains what is left, so every report is handled before the job goes on
(a webhook's "finished" comes after the last "checkpoint"). The queue's actor is pinned to the driver's node:
placed anywhere, it dies with its node, and a run that Train carried through a node's death would then fail at
the end (seen on the two-node test cluster); a lost queue never fails the job.
"""
from __future__ import annotations

import logging
import threading

from ray.train import UserCallback

log = logging.getLogger("flux_ray")


class RelayCallback(UserCallback):
    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if not m:
            return
        try:
            self.queue.put({"metrics": m, "checkpoint": checkpoint.path if checkpoint else None}, timeout=10)
        except Exception as e:  # progress and webhooks must not take training down
            log.warning("report relay: %s", e)


class ReportRelay:
    def __init__(self, handlers: list):
        self.handlers = handlers
        self._stop = threading.Event()

    def __enter__(self) -> ReportRelay:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.callback = RelayCallback(self._queue)
        self._thread = threading.Thread(target=self._run, name="flux-ray-report-relay", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            while not self._queue.empty():
                self._handle(self._queue.get(timeout=5))
        except Exception as e:  # noqa: BLE001 - the queue's actor is gone: lose its last reports, not the job
            log.warning("report relay: %s", e)
        finally:
            try:
                self._queue.shutdown()
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception as e:  # the queue actor went away: the run is ending
                log.debug("report relay: %s", e)
                return
            self._handle(item)

    def _handle(self, item: dict) -> None:
        for handler in self.handlers:
            try:
                handler(item["metrics"], item["checkpoint"])
            except Exception as e:
                log.warning("report handler %s failed: %s", getattr(handler, "__qualname__", handler), e)
