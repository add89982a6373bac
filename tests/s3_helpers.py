"""Real storage servers on 127.0.0.1 for tests, and img2dataset-shaped shards made here.

``s3_server``: moto's standalone S3-protocol server (``moto_server``, the one s3fs's own tests run against) on a
free port, for the session; it exports ``AWS_ENDPOINT_URL`` and dummy credentials, the standard way every
AWS client (and s3fs) finds an endpoint. ``http_server``: Python's ``http.server`` serving a temp folder.
``make_pool``: ``NNNNN.tar`` shards with ``KEY.jpg``/``KEY.txt``/``KEY.json`` per sample, plus ``NNNNN.parquet``
and ``NNNNN_stats.json`` beside each, like img2dataset writes them.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

MOTO = shutil.which("moto_server") or str(Path(__file__).resolve().parents[1] / ".venv/bin/moto_server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(port: int, seconds: float = 20.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on 127.0.0.1:{port} after {seconds} s")


@dataclass
class S3Server:
    """A running moto server: its endpoint; ``fs()`` gives an s3fs file system on it."""

    endpoint: str

    def fs(self):
        import s3fs
        return s3fs.S3FileSystem(skip_instance_cache=True)

    def upload(self, local: Path, url: str) -> None:
        self.fs().put(str(local), url, recursive=local.is_dir())


@pytest.fixture(scope="session")
def s3_server():
    if not os.path.exists(MOTO):
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        _wait_for(port)
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """``(root folder, base URL)`` of an http.server thread serving that folder."""
    root = tmp_path_factory.mktemp("http")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _jpeg(rng: np.random.Generator, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shard(folder: Path, shard: int, samples: int, rng: np.random.Generator,
                            failed: int = 1, stats_successes: int | None = None, no_image: int = 0) -> Path:
    """``NNNNN.tar`` (KEY.jpg/.txt/.json), ``NNNNN.parquet`` and ``NNNNN_stats.json`` as img2dataset writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard:05d}"
    keys = [f"{shard:05d}{i:04d}" for i in range(samples + no_image)]
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for i, key in enumerate(keys):
            meta = {"url": f"http://example.invalid/{key}.jpg", "key": key, "status": "success",
                    "caption": f"photo {key}", "label": int(rng.integers(0, 3))}
            if i < samples:
                _add(tar, f"{key}.jpg", _jpeg(rng))
            _add(tar, f"{key}.txt", meta["caption"].encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    rows = {"key": keys + [f"{name}fail{i}" for i in range(failed)],
            "status": ["success"] * len(keys) + ["failed_to_download"] * failed}
    pq.write_table(pa.table(rows), folder / f"{name}.parquet")
    stats = {"count": len(keys) + failed, "successes": samples if stats_successes is None else stats_successes,
             "failed_to_download": failed}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats))
    return folder / f"{name}.tar"


def make_pool(folder: Path, shards: int = 3, samples: int = 5, seed: int = 0) -> list[Path]:
    """An img2dataset-shaped pool of ``shards`` tars of ``samples`` images each."""
    rng = np.random.default_rng(seed)
    return [write_img2dataset_shard(folder, s, samples, rng) for s in range(shards)]
