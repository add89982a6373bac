"""A TCP proxy in front of the S3 server that SIGKILLs a client in the middle of one upload.

``KillingProxy(port, name)`` forwards every connection to ``127.0.0.1:port`` unchanged, except the first
``PUT`` whose request line names ``name``: it forwards that request's headers and half of its body, then sends
SIGKILL to ``pid`` and drops both connections, so the server sees a PUT cut in the middle of its body, exactly
as when a writer dies mid-upload.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading


class KillingProxy:
    def __init__(self, port: int, name: str):
        self.port, self.pid, self.killed = port, None, threading.Event()
        self.pattern = re.compile(rb"PUT [^ ]*" + re.escape(name.encode()) + rb" HTTP")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.port))
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        body = None  # bytes of the PUT's body forwarded, once its headers went through
        need = 0
        while True:
            data = client.recv(1 << 16)
            if not data:
                break
            if body is None and not self.killed.is_set() and self.pattern.search(data) and b"\r\n\r\n" in data:
                head_end = data.find(b"\r\n\r\n") + 4  # headers go through whole (Expect: 100-continue waits)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[:head_end])
                need, body = max(1, int(length.group(1)) // 2 if length else 1), 0
                upstream.sendall(data[:head_end])
                data = data[head_end:]
            if body is None:
                upstream.sendall(data)
                continue
            upstream.sendall(data[:need - body])
            body += len(data[:need - body])
            if body >= need:  # half the body is at the server: the writer dies now
                os.kill(self.pid, signal.SIGKILL)
                self.killed.set()
                break
        for end in (client, upstream):
            end.close()

    def close(self) -> None:
        self.sock.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for end in (src, dst):
            try:
                end.close()
            except OSError:
                pass
