"""The report relay (Train's controller -> the driver's progress lines and webhooks) on a real local Ray."""
from __future__ import annotations

import ray


def test_reports_reach_the_handlers_in_order_and_a_lost_queue_does_not_fail_the_job(ray_session):
    from flux_ray.tracking.report_relay import ReportRelay

    seen = []
    with ReportRelay([lambda m, c: seen.append((m["step"], c))]) as relay:
        for step in (1, 2, 3):
            relay.callback.after_report(None, [{"step": step}], None)
        # the queue's actor lives on the driver's node (it must not die with a worker node)
        state = ray.util.state.get_actor(relay._queue.actor._actor_id.hex(),  # this cluster's (xdist: one per worker)
                                         address=ray.get_runtime_context().gcs_address)
        assert state.node_id == ray.get_runtime_context().get_node_id()
    assert seen == [(1, None), (2, None), (3, None)]  # drained on exit, in order

    with ReportRelay([lambda m, c: None]) as relay:
        ray.kill(relay._queue.actor)  # as when its node dies: exiting the relay must not raise
