"""HTTP downloads of one image each, with a total deadline and instant cancellation (``vlm2rec-data``).

``download(url, opts, watchdog)`` makes up to ``opts.retries + 1`` tries with backoff, all within
``opts.deadline`` seconds; ``opts.timeout`` bounds the connect and each wait for bytes. A per-read timeout
alone would let a server that trickles a byte now and then hold a worker forever, so every try registers
its sockets with the run's :class:`Watchdog`: the main thread calls ``sweep()`` a few times a second and
shuts down the sockets of tries past their deadline (which wakes a thread blocked in connect or recv), and
``halt()`` (Ctrl-C) shuts down all of them at once. ``opts`` is an ``images.ImageOptions``.
"""
from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

MAX_DOWNLOAD_BYTES = 32 << 20          # larger responses are not product photos; refuse them
USER_AGENT = "vlm2rec-data/0.1 (+https://github.com/recbole-vlm2rec)"
_READ_BYTES = 1 << 16


class Failure(Exception):
    """An image that could not be had: ``status`` is its manifest status (missing, failed, corrupt)."""

    def __init__(self, status: str, error: str, attempts: int = 1):
        super().__init__(error)
        self.status, self.error, self.attempts = status, error, attempts


class Stopped(Exception):
    """The run is being interrupted: the item is left undone, without a manifest entry."""


class _Try:
    """One HTTP try: its deadline and its sockets, so that another thread can cut it off."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.cut: Optional[str] = None      # "deadline" or "stop" once cut off
        self.received = 0                   # body bytes so far (for the error message)
        self._lock = threading.Lock()
        # Duplicates of the sockets, closed only here: shutting down a socket that urllib has closed
        # meanwhile could hit an unrelated file that reused its descriptor.
        self._socks: list = []

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock.dup())
            if self.cut:
                _shut(self._socks[-1])

    def cut_off(self, why: str) -> None:
        with self._lock:
            self.cut = self.cut or why
            for s in self._socks:
                _shut(s)

    def close(self) -> None:
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)     # wakes the thread blocked in connect() or recv() on it
    except OSError:
        pass                                # not connected (yet), or already closed by the peer


class Watchdog:
    """The live HTTP tries of one run; :meth:`sweep` (called by the main thread) cuts off those past their
    deadline, :meth:`halt` all of them (Ctrl-C)."""

    def __init__(self):
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._live: set = set()

    @contextlib.contextmanager
    def attempt(self, deadline: float):
        if self.stop.is_set():
            raise Stopped
        t = _Try(deadline)
        with self._lock:
            self._live.add(t)
        _current.attempt = t
        try:
            yield t
        finally:
            _current.attempt = None
            with self._lock:
                self._live.discard(t)
            t.close()

    def sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            live = list(self._live)
        for t in live:
            if self.stop.is_set():
                t.cut_off("stop")
            elif now >= t.deadline:
                t.cut_off("deadline")

    def halt(self) -> None:
        self.stop.set()
        self.sweep()


_current = threading.local()      # the _Try of the download running in this thread


def _connect(address, timeout, source_address=None) -> socket.socket:
    """socket.create_connection, but each socket is handed to the current try before it connects, so
    that a deadline or Ctrl-C also cuts off a connect in progress."""
    attempt = _current.attempt
    error: Optional[OSError] = None
    for family, kind, proto, _, addr in socket.getaddrinfo(*address, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            attempt.watch(sock)
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(addr)
            if attempt.cut:
                raise OSError("cut off")
            return sock
        except OSError as e:
            sock.close()
            error = e
            if attempt.cut:
                break
    raise error or OSError(f"no address for {address[0]}")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect      # http.client's own hook for opening the socket


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)   # replaces the default handlers


def _fetch(url: str, opts, attempt: _Try) -> bytes:
    """One GET. The body is read in pieces, each returned as soon as some bytes arrive, so that the
    deadline is also checked between them."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    parts = []
    with _OPENER.open(req, timeout=opts.timeout) as resp:
        while True:
            if time.monotonic() >= attempt.deadline:
                attempt.cut_off("deadline")
            if attempt.cut:
                raise OSError("cut off")
            part = resp.read1(_READ_BYTES)
            if not part:
                break
            parts.append(part)
            attempt.received += len(part)
            if attempt.received > MAX_DOWNLOAD_BYTES:
                raise Failure("failed", f"larger than {MAX_DOWNLOAD_BYTES} bytes")
    if attempt.cut:                         # a socket shut down by the watchdog reads as the end of data
        raise OSError("cut off")
    return b"".join(parts)


def download(url: str, opts, watchdog: Watchdog) -> tuple[bytes, int]:
    """GET ``url`` with retries within ``opts.deadline``; returns (body, attempts) or raises
    Failure("missing"|"failed"), or Stopped once the watchdog is halted."""
    give_up = time.monotonic() + opts.deadline
    error = ""
    for attempt in range(opts.retries + 1):
        if attempt:
            pause = opts.backoff * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)
            if time.monotonic() + pause >= give_up:
                raise Failure("failed", f"{error} (after {attempt} tries; the {opts.deadline:g} s download "
                                         f"deadline leaves no time for another)", attempt)
            if watchdog.stop.wait(pause):
                raise Stopped
        with watchdog.attempt(give_up) as t:
            try:
                return _fetch(url, opts, t), attempt + 1
            except Failure as f:
                f.attempts = attempt + 1
                raise
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if t.cut is None and 400 <= e.code < 500 and e.code not in (408, 429):
                    raise Failure("missing", error, attempt + 1) from None
            except (OSError, http.client.HTTPException) as e:     # URLError, timeouts, resets, bad responses
                reason = getattr(e, "reason", e)
                error = "timed out" if isinstance(reason, TimeoutError) else f"{type(reason).__name__}: {reason}"
            if t.cut == "stop":
                raise Stopped
            if t.cut:
                raise Failure("failed", f"download deadline of {opts.deadline:g} s passed during try {attempt + 1} "
                                         f"({t.received} bytes received); a rerun tries again (or raise "
                                         f"--download-deadline)", attempt + 1)
    raise Failure("failed", f"{error} (after {opts.retries + 1} tries)", opts.retries + 1)
