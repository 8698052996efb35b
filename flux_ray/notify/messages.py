"""Webhook events and their wire formats: generic JSON (``raw``), Discord and Slack.

SimpleTuner's ``webhook_config`` names the formats ``raw`` and ``discord``; Slack's incoming webhooks take ``text``.
Discord gets the validation image as a multipart file attachment (``payload_json`` + ``files[0]``).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

EVENTS = ("started", "validation", "checkpoint", "finished", "failed")


@dataclass
class Event:
    kind: str                          # one of EVENTS
    job: str                           # the spec's name
    message: str                       # one human line
    data: dict = field(default_factory=dict)
    image_png: bytes | None = None     # the validation grid (sent as a file to Discord)
    image_name: str | None = None
    timestamp: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.kind not in EVENTS:
            raise ValueError(f"unknown webhook event {self.kind!r} (one of {EVENTS})")


def encode(event: Event, webhook_type: str, prefix: str) -> tuple[bytes, str]:
    """(body, content type) of the event for a webhook of the given type."""
    text = f"{prefix}: {event.message}" if prefix else event.message
    if webhook_type == "raw":
        body = {"event": event.kind, "job": event.job, "message": text, "timestamp": event.timestamp, **event.data}
        return json.dumps(body, default=str).encode(), "application/json"
    if webhook_type == "slack":
        return json.dumps({"text": text}).encode(), "application/json"
    if webhook_type == "discord":
        payload = {"content": text[:2000]}  # Discord's message limit
        if not event.image_png:
            return json.dumps(payload).encode(), "application/json"
        name = event.image_name or "validation.png"
        payload["attachments"] = [{"id": 0, "filename": name}]
        return _multipart([("payload_json", None, "application/json", json.dumps(payload).encode()),
                           ("files[0]", name, "image/png", event.image_png)])
    raise ValueError(f"unknown webhook_type {webhook_type!r}")


def _multipart(parts: list[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += [f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode(), data, b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"
