"""Shards over HTTP (``data.url_prefix``): read by training and the loader as the local
files are, resumed exactly, retried where a connection broke, hashed as they stream, and
never downloaded whole before the first sample."""

from __future__ import annotations

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cope_megatron.data import integrity
from cope_megatron.data.format import DataError, read_manifest
from cope_megatron.data.loader import ResumableLoader
from cope_megatron.data.source import located, ordered_samples, split_spec
from tests.helpers import losses, train_here


class Server:
    """Files of ``root`` on 127.0.0.1, honouring ``Range``; the next ``breaks`` responses
    (-1: all) stop after ``cut`` body bytes and drop the connection."""

    def __init__(self, root: Path) -> None:
        self.root, self.breaks, self.cut, self.gets, self.heads = root, 0, 0, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._send(head=True)

            def do_GET(self) -> None:
                self._send(head=False)

            def _send(self, head: bool) -> None:
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if head:
                    server.heads.append(self.path)
                    return
                server.gets.append((self.path, start))
                body = data[start:]
                if server.breaks:
                    server.breaks -= 1
                    self.wfile.write(body[:server.cut])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(prepared, tmp_path):
    """(a copy of the prepared shards, its server)."""
    root = tmp_path / "served"
    shutil.copytree(prepared[0], root)
    server = Server(root)
    integrity._results.clear()
    yield root, server
    server.stop()
    integrity._results.clear()


def http_spec(root: Path, server: Server, **kw):
    manifest = located(read_manifest(root), server.url, None)
    return split_spec(root, manifest, "train", **{"url_backoff_s": 0.0, **kw})


def test_loader_over_http_matches_local_and_resumes_exactly(prepared, served):
    root, server = served
    local = ResumableLoader(split_spec(prepared[0], read_manifest(prepared[0]), "train",
                                       micro_batch_size=4, streams=2))
    remote = ResumableLoader(http_spec(root, server, micro_batch_size=4, streams=2))
    assert remote.spec.shards[0].url.startswith(server.url) and not remote.spec.shards[0].local
    want = [next(local)["tokens"].numpy() for _ in range(12)]
    got = [next(remote)["tokens"].numpy() for _ in range(5)]
    state = remote.state_dict()
    remote.close()
    resumed = ResumableLoader(http_spec(root, server, micro_batch_size=4, streams=2),
                              ResumableLoader.check_state(state, remote.spec))
    got += [next(resumed)["tokens"].numpy() for _ in range(7)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    assert server.gets


def test_broken_connections_resume_where_they_broke(prepared, served):
    root, server = served
    server.breaks, server.cut = 2, 3000
    want = list(ordered_samples(split_spec(prepared[0], read_manifest(prepared[0]), "train")))
    got = list(ordered_samples(http_spec(root, server, url_retries=2)))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(want, got, strict=True))
    first = server.gets[0][0]
    assert [g for g in server.gets if g[0] == first][:3] == [(first, 0), (first, 3000),
                                                              (first, 6000)]


def test_a_dead_server_gets_bounded_retries_then_one_error_naming_the_url(served):
    root, server = served
    server.breaks, server.cut = -1, 3000  # every response breaks off
    spec = http_spec(root, server, url_retries=3)
    samples = ordered_samples(spec)
    next(samples)  # the first samples arrive before the shard's end: streamed, not fetched
    with pytest.raises(DataError, match=rf"shard {spec.shards[0].url}: reading failed 4 "
                                        "times.*data.url_retries"):
        list(samples)
    assert len(server.gets) == 4


def test_a_changed_remote_shard_fails_at_its_end_by_its_digest(served):
    root, server = served
    manifest = read_manifest(root)
    name = manifest["splits"]["train"]["shards"][0]["name"]
    data = bytearray((root / name).read_bytes())
    data[-1] ^= 1  # in the tar's end padding, which no reader parses: only the digest sees it
    (root / name).write_bytes(bytes(data))
    spec = http_spec(root, server)
    with pytest.raises(DataError, match=rf"shard {spec.shards[0].url} .*sha256"):
        list(ordered_samples(spec))
    integrity._results.clear()
    assert list(ordered_samples(http_spec(root, server, verify="off")))


def test_training_reads_http_shards_and_startup_asks_only_their_size(prepared, served,
                                                                      tmp_path):
    root, server = served
    train_here(prepared[0], tmp_path / "local", **{"train.steps": 3})
    for path in root.glob("*.tar"):  # the run's data.shards keeps the manifest alone
        path.rename(tmp_path / path.name)
    server.root = tmp_path
    train_here(root, tmp_path / "http", **{"train.steps": 3, "data.url_prefix": server.url})
    assert losses(tmp_path / "http") == losses(tmp_path / "local")
    splits = read_manifest(root)["splits"].values()
    assert sorted(server.heads) == sorted(f"/{s['name']}" for split in splits
                                          for s in split["shards"])
    assert server.gets


def test_a_failing_pipe_command_is_rerun_past_what_it_delivered_then_named(prepared,
                                                                            tmp_path):
    """``pipe:`` shards (an object store's CLI): a command that breaks off and exits non-zero
    is run again, the bytes already read skipped; one that always fails is named."""
    shards = prepared[0]
    manifest = read_manifest(shards)
    flaky = (f"pipe:f() {{ if [ -e {tmp_path}/ran-$(basename $1) ]; then cat $1; else "
             f"touch {tmp_path}/ran-$(basename $1); head -c 3000 $1; exit 1; fi; }}; f {shards}/")
    want = list(ordered_samples(split_spec(shards, manifest, "train")))
    spec = split_spec(shards, located(manifest, flaky, None), "train", url_backoff_s=0.0)
    got = list(ordered_samples(spec))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(want, got, strict=True))
    assert len(list(tmp_path.glob("ran-*"))) == len(spec.shards)
    dead = split_spec(shards, located(manifest, "pipe:exit 3; echo ", None), "train",
                      url_retries=2, url_backoff_s=0.0)
    with pytest.raises(DataError, match=r"shard pipe:exit 3; echo \S+: reading failed 3"
                                        r" times.*status 3"):
        next(ordered_samples(dead))
