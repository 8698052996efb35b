"""Webhook delivery against a local HTTP receiver: order, retries with backoff, formats, no secret in logs."""
from __future__ import annotations

import email.parser
import json
import logging
import time

from flux_ray.notify.messages import Event, encode
from flux_ray.notify.sender import WebhookSender

TOKEN = "s3cr3t-T0KEN-abcdef"


def _events(n_images: int = 0) -> list[Event]:
    png = b"\x89PNG\r\n\x1a\nfake"
    return [Event("started", "job", "started"),
            Event("validation", "job", "validation at step 2/4", {"step": 2}, png, "step-000002.png"),
            Event("checkpoint", "job", "checkpoint at step 2/4", {"step": 2, "checkpoint": "/x/checkpoint_1"}),
            Event("finished", "job", "finished", {"lora": "/x/lora.safetensors"})]


def test_events_arrive_in_order_and_failed_tries_are_retried_with_backoff(webhook_receiver, caplog):
    rec = webhook_receiver(fail_first=2)
    caplog.set_level(logging.DEBUG, logger="flux_ray")
    sender = WebhookSender(f"{rec.url}/hooks/{TOKEN}", "raw", "demo", max_retries=3, backoff_s=0.2)
    t0 = time.monotonic()
    for e in _events():
        sender.send(e)
    sent_in = time.monotonic() - t0
    sender.close()
    assert sent_in < 0.1  # send only enqueues, even while the receiver fails
    assert [r["status"] for r in rec.requests] == [503, 503, 204, 204, 204, 204]
    bodies = [json.loads(r["body"]) for r in rec.requests if r["status"] == 204]
    assert [b["event"] for b in bodies] == ["started", "validation", "checkpoint", "finished"]
    assert bodies[0]["message"] == "demo: started" and bodies[2]["checkpoint"] == "/x/checkpoint_1"
    assert sender.delivered == [("started", 3), ("validation", 1), ("checkpoint", 1), ("finished", 1)]
    assert time.monotonic() - t0 >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s
    assert "retrying" in caplog.text and TOKEN not in caplog.text and "/hooks/" not in caplog.text


def test_an_unreachable_receiver_drops_events_without_raising(webhook_receiver, caplog):
    rec = webhook_receiver()
    url = f"{rec.url}/{TOKEN}"
    rec.close()  # nothing listens any more
    caplog.set_level(logging.INFO, logger="flux_ray")
    sender = WebhookSender(url, "slack", "", max_retries=1, backoff_s=0.01)
    sender.send(Event("failed", "job", "failed: boom"))
    sender.close()
    assert sender.delivered == [] and sender.dropped and sender.dropped[0][0] == "failed"
    assert TOKEN not in caplog.text


def test_discord_gets_the_validation_image_as_multipart_and_slack_gets_text(webhook_receiver):
    rec = webhook_receiver()
    discord = WebhookSender(f"{rec.url}/discord/{TOKEN}", "discord", "demo", max_retries=0)
    slack = WebhookSender(f"{rec.url}/slack", "slack", "demo", max_retries=0)
    events = _events()
    discord.send(events[1])
    discord.send(events[3])
    discord.close()
    slack.send(events[3])
    slack.close()
    image_req, text_req, slack_req = rec.requests
    ctype = image_req["headers"]["Content-Type"]
    assert ctype.startswith("multipart/form-data; boundary=")
    msg = email.parser.BytesParser().parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + image_req["body"])
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
    payload = json.loads(parts["payload_json"].get_payload(decode=True))
    assert payload["content"] == "demo: validation at step 2/4"
    assert payload["attachments"] == [{"id": 0, "filename": "step-000002.png"}]
    assert parts["files[0]"].get_filename() == "step-000002.png"
    assert parts["files[0]"].get_payload(decode=True) == events[1].image_png
    assert json.loads(text_req["body"]) == {"content": "demo: finished"}
    assert json.loads(slack_req["body"]) == {"text": "demo: finished"}


def test_raw_json_carries_the_event_data():
    body, ctype = encode(Event("finished", "job", "finished", {"lora": "s3://b/lora"}), "raw", "")
    assert ctype == "application/json"
    data = json.loads(body)
    assert data["event"] == "finished" and data["job"] == "job" and data["lora"] == "s3://b/lora"


def test_the_notify_section_sets_prefix_and_retries(webhook_receiver, tmp_path, demo_data_dir):
    from flux_ray.spec import load_spec

    rec = webhook_receiver(fail_first=1)
    base = {"name": "job-a", "datasets": [{"id": "d", "instance_data_dir": demo_data_dir}],
            "output": {"uri": str(tmp_path / "out")}, "cache": {"uri": str(tmp_path / "cache")}}
    no_retry = load_spec(data={**base, "notify": {"webhook_url": rec.url, "webhook_max_retries": 0}})
    sender = WebhookSender.from_spec(no_retry)
    sender.send(Event("started", "job-a", "started"))
    sender.close()
    assert sender.delivered == [] and sender.dropped == [("started", "HTTP 503")]  # no second try
    prefixed = load_spec(data={**base, "notify": {"webhook_url": rec.url, "message_prefix": "team-a"}})
    sender = WebhookSender.from_spec(prefixed)
    sender.send(Event("started", "job-a", "started"))
    sender.close()
    assert json.loads(rec.requests[-1]["body"])["message"] == "team-a: started"
    assert WebhookSender.from_spec(load_spec(data=base)) is None  # no URL, no sender
