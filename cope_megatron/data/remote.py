"""Shard bytes from wherever they lie: a local file, ``http(s)://`` or a ``pipe:`` command
(an object store's CLI writing the object to stdout, e.g. ``pipe:aws s3 cp s3://b/x.tar -``).

A remote shard is read as one stream, never downloaded whole first. A connection that
drops mid-shard is reopened where it broke (HTTP: a ``Range`` request; a server that
ignores it, or a command, is re-read and the bytes already delivered skipped), at most
``retries`` times with doubling waits from ``backoff_s``; then one DataError names the
URL. A stream also counts as broken when it ends short of the size the manifest records,
or a command exits non-zero. The stream hashes what it delivers (``sha256``) so that the
reader can check a remote shard's digest as it goes (``integrity``): hashing a remote
shard before reading it would download it twice.

Written by hand: WebDataset's ``gopen`` runs ``curl`` in a pipe and gives up at the first
broken connection; urllib has no resuming reader either.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import subprocess
import time
import urllib.request

from cope_megatron.data.format import DataError

HTTP = ("http://", "https://")
PIPE = "pipe:"


def is_remote(url: str) -> bool:
    return url.startswith(HTTP) or url.startswith(PIPE)


class ShardStream(io.RawIOBase):
    """The bytes of the shard at ``url``, reopened where they broke off (up to ``retries``
    times); ``size`` (the manifest's, or None) makes a short stream an error."""

    def __init__(self, url: str, size: int | None = None, retries: int = 3,
                 backoff_s: float = 1.0, timeout_s: float = 60.0) -> None:
        super().__init__()
        self.url, self.size, self.retries = url, size, retries
        self.backoff_s, self.timeout_s = backoff_s, timeout_s
        self.pos = 0
        self.sha256 = hashlib.sha256()
        self._src = None
        self._proc: subprocess.Popen | None = None
        self._failures = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._done:
            try:
                if self._src is None:
                    self._open()
                n = self._src.readinto(buf)
                if n:
                    self._deliver(memoryview(buf)[:n])
                    return n
                self._finish()
            except (OSError, ValueError, DataError, http.client.HTTPException) as e:
                self._retry(e)
        return 0

    def _deliver(self, data: memoryview) -> None:
        self.sha256.update(data)
        self.pos += len(data)

    def _finish(self) -> None:
        """End of the source: whole, or broken off short of the recorded size."""
        code = self._close_source(ended=True)
        if code:
            raise DataError(f"command exited with status {code}")
        if self.size is not None and self.pos < self.size:
            raise DataError(f"stream ended after {self.pos} of {self.size} bytes")
        self._done = True

    def _open(self) -> None:
        if self.url.startswith(PIPE):
            self._proc = subprocess.Popen(self.url[len(PIPE):], shell=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self._src = self._proc.stdout
            skip = self.pos
        elif self.url.startswith(HTTP):
            request = urllib.request.Request(self.url)
            if self.pos:
                request.add_header("Range", f"bytes={self.pos}-")
            self._src = urllib.request.urlopen(request, timeout=self.timeout_s)
            skip = self.pos if self._src.status != 206 else 0
        else:
            self._src = open(self.url, "rb", buffering=0)
            skip = self.pos
        while skip:  # a source that restarted from byte 0: drop what was delivered
            chunk = self._src.read(min(skip, 1 << 20))
            if not chunk:
                raise DataError(f"stream ended after {self.pos - skip} bytes on reopening")
            skip -= len(chunk)

    def _close_source(self, ended: bool = False) -> int | None:
        """Close the source; a command that ``ended`` its output is waited for and its exit
        status returned, one cut off is killed."""
        src, proc = self._src, self._proc
        self._src = self._proc = None
        if src is not None:
            src.close()
        if proc is None:
            return None
        if not ended:
            proc.kill()
        return proc.wait()

    def _retry(self, error: Exception) -> None:
        self._close_source()
        self._failures += 1
        if self._failures > self.retries:
            self._done = True
            raise DataError(
                f"shard {self.url}: reading failed {self._failures} times, last after byte "
                f"{self.pos} ({type(error).__name__}: {error}); check that the server or store "
                "is reachable, or raise data.url_retries") from error
        time.sleep(self.backoff_s * 2 ** (self._failures - 1))

    def close(self) -> None:
        self._close_source()
        super().close()


def remote_size(url: str, timeout_s: float = 30.0) -> int | None:
    """The size an HTTP server states for ``url`` (a HEAD request, nothing downloaded); None
    for commands, which cannot be asked without reading. Raises DataError if it is absent."""
    if not url.startswith(HTTP):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=timeout_s) as r:
            length = r.headers.get("Content-Length")
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"shard {url} cannot be reached ({e})") from e
    return int(length) if length is not None else None
