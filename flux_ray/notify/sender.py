"""Delivery of webhook events in a background thread, in order, retried with exponential backoff.

``send`` only enqueues: a slow, failing or unreachable receiver never blocks or fails training. The URL is never
logged (a Discord or Slack URL carries its token in the path); logs name the scheme and host only.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from flux_ray.notify.messages import Event, encode

log = logging.getLogger("flux_ray.notify")
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def where(url: str) -> str:
    """What a log may say about a webhook URL: its scheme and host, no path, query or credentials."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.hostname}" + (f":{p.port}" if p.port else "")


class WebhookSender:
    def __init__(self, url: str, webhook_type: str = "raw", prefix: str = "", max_retries: int = 5,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, timeout_s: float = 10.0):
        self._url, self.webhook_type, self.prefix = url, webhook_type, prefix
        self.max_retries, self.backoff_s, self.max_backoff_s, self.timeout_s = \
            max_retries, backoff_s, max_backoff_s, timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self.delivered: list[tuple[str, int]] = []   # (event kind, attempts) in delivery order
        self.dropped: list[tuple[str, str]] = []     # (event kind, last error)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}) if _is_local(url) else
                                                   urllib.request.ProxyHandler())
        self._thread = threading.Thread(target=self._run, name="flux-ray-webhook", daemon=True)
        self._thread.start()

    @classmethod
    def from_spec(cls, spec) -> WebhookSender | None:
        n = spec.notify
        if not n.webhook_url:
            return None
        prefix = spec.name if n.message_prefix is None else n.message_prefix
        return cls(n.webhook_url, n.webhook_type, prefix, n.webhook_max_retries)

    def send(self, event: Event) -> None:
        """Enqueue; returns at once."""
        self._queue.put(event)

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued (waiting at most ``timeout_s``), then stop; backoff waits are cut short."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._closing.set()
        self._thread.join(self.timeout_s + 1)
        if self._thread.is_alive() or not self._queue.empty():
            log.warning("webhook %s: %d event(s) not delivered at exit", where(self._url), self._queue.qsize())

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self._deliver(event)
            except Exception as e:  # never let the thread die: later events still go out
                self.dropped.append((event.kind, type(e).__name__))
                log.warning("webhook %s: %s event not sent (%s)", where(self._url), event.kind, type(e).__name__)

    def _deliver(self, event: Event) -> None:
        body, ctype = encode(event, self.webhook_type, self.prefix)
        error = ""
        for attempt in range(1, self.max_retries + 2):
            retry_after = None
            try:
                req = urllib.request.Request(self._url, data=body, method="POST",
                                             headers={"Content-Type": ctype, "User-Agent": "flux-ray"})
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    resp.read()
                self.delivered.append((event.kind, attempt))
                return
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    break
                retry_after = _seconds(e.headers.get("Retry-After"))
            except (urllib.error.URLError, OSError) as e:
                error = type(e).__name__
            if attempt <= self.max_retries:
                wait = min(self.max_backoff_s, retry_after if retry_after is not None
                           else self.backoff_s * 2 ** (attempt - 1))
                log.info("webhook %s: %s event attempt %d failed (%s), retrying in %.1f s", where(self._url),
                         event.kind, attempt, error, wait)
                if self._closing.wait(wait):
                    break
        self.dropped.append((event.kind, error))
        log.warning("webhook %s: %s event dropped after %d attempt(s) (%s)", where(self._url), event.kind,
                    attempt, error)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _is_local(url: str) -> bool:
    return urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
