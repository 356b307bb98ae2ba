"""Official checkpoints by name, against a real HTTP server on 127.0.0.1 serving a generated file."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from mobilesam_se import weights
from mobilesam_se.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = os.urandom(300_000)  # generated: a stand-in checkpoint of 3 read chunks' worth


class _Server:
    """Serves PAYLOAD at /good, a wrong body at /bad and a body cut short at /cut; records requests."""

    def __init__(self) -> None:
        self.requests: List[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.requests.append(self.path)
                body = PAYLOAD if self.path != "/bad" else PAYLOAD[::-1]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path == "/cut":
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # the server goes away mid-body
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    try:
        yield s
    finally:
        s.close()


def _table(tmp_path: Path, entries: Dict[str, Dict[str, str]], monkeypatch) -> Path:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(entries))
    monkeypatch.setenv(weights.ENV_TABLE, str(path))
    return path


SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(weights.ENV_OFFLINE, raising=False)


def _files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_then_cache_hit_without_a_second_request(tmp_path, server, monkeypatch):
    _table(tmp_path, {"stand_in": {"url": server.url("/good"), "sha256": SHA, "filename": "stand_in.pt"}}, monkeypatch)
    path = weights.resolve("stand_in", progress=False)
    assert Path(path) == tmp_path / "cache" / "stand_in.pt"
    assert Path(path).read_bytes() == PAYLOAD
    assert server.requests == ["/good"]
    assert weights.resolve("stand_in", progress=False) == path
    assert server.requests == ["/good"]  # cache hit: the server is not asked again
    assert _files(tmp_path / "cache") == ["stand_in.pt", "stand_in.pt.sha256"]
    # A file changed in place no longer passes (the stamp is checked, then the hash): downloaded again.
    Path(path).write_bytes(PAYLOAD[:10])
    assert Path(weights.resolve("stand_in", progress=False)).read_bytes() == PAYLOAD
    assert server.requests == ["/good", "/good"]


def test_hash_mismatch_is_a_clear_error_and_nothing_is_cached(tmp_path, server, monkeypatch):
    _table(tmp_path, {"stand_in": {"url": server.url("/bad"), "sha256": SHA, "filename": "stand_in.pt"}}, monkeypatch)
    with pytest.raises(UserError, match=f"stand_in.*{server.url('/bad')}.*SHA-256.*expected {SHA}.*not kept"):
        weights.resolve("stand_in", progress=False)
    assert _files(tmp_path / "cache") == []


def test_interrupted_download_leaves_nothing_that_looks_valid(tmp_path, server, monkeypatch):
    _table(tmp_path, {"stand_in": {"url": server.url("/cut"), "sha256": SHA, "filename": "stand_in.pt"}}, monkeypatch)
    with pytest.raises(UserError) as info:
        weights.resolve("stand_in", progress=False)
    msg = str(info.value)
    assert server.url("/cut") in msg and str(tmp_path / "cache" / "stand_in.pt") in msg
    assert "python -m mobilesam_se.weights fetch stand_in" in msg
    assert _files(tmp_path / "cache") == []
    assert not weights.is_cached(weights.table()["stand_in"], tmp_path / "cache")


def test_unreachable_and_offline_name_url_cache_and_fetch_command(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused, no traffic leaves the host
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _table(tmp_path, {
        "a": {"url": f"http://127.0.0.1:{port}/a.pt", "sha256": SHA},
        "b": {"url": f"http://127.0.0.1:{port}/b.pt", "sha256": SHA},
    }, monkeypatch)
    with pytest.raises(UserError) as info:
        weights.resolve_many(["a", "b"], progress=False)
    msg = str(info.value)
    for name in ("a", "b"):
        assert f"http://127.0.0.1:{port}/{name}.pt -> {tmp_path / 'cache' / (name + '.pt')}" in msg
    assert "python -m mobilesam_se.weights fetch a b" in msg
    monkeypatch.setenv(weights.ENV_OFFLINE, "1")
    with pytest.raises(UserError, match="MOBILESAM_SE_OFFLINE"):
        weights.resolve("a")


def test_local_paths_still_work_and_a_missing_one_names_it(tmp_path):
    f = tmp_path / "mine.pt"
    f.write_bytes(b"x")
    assert weights.resolve(str(f)) == str(f)
    assert weights.resolve(None) is None
    with pytest.raises(UserError, match="checkpoint not found: .*nope.pt.*sam_vit_h"):
        weights.resolve(str(tmp_path / "nope.pt"))


def test_official_table_names_the_published_files():
    t = weights.OFFICIAL
    assert set(t) == {"mobile_sam", "sam_vit_h", "sam_vit_l", "sam_vit_b"}
    for e in t.values():
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert e.url.endswith("/" + e.filename)
    assert t["sam_vit_h"].url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.ENV_DIR)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert weights.weights_dir() == tmp_path / "th" / "mobilesam_se"
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path / "w"))
    assert weights.weights_dir() == tmp_path / "w"
    assert weights.weights_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"


def test_cli_fetch_and_list(tmp_path, server, monkeypatch):
    table = _table(tmp_path, {"stand_in": {"url": server.url("/good"), "sha256": SHA, "filename": "s.pt"}}, monkeypatch)
    env = {**os.environ, weights.ENV_TABLE: str(table), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mobilesam_se.weights"]
    done = subprocess.run(cmd + ["fetch", "stand_in", "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache" / "s.pt").read_bytes() == PAYLOAD
    listed = subprocess.run(cmd + ["list"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0
    line = next(x for x in listed.stdout.splitlines() if x.startswith("stand_in"))
    assert "cached" in line and "not cached" not in line
    assert "sam_vit_h   not cached" in listed.stdout
    bad = subprocess.run(cmd + ["fetch", "nonesuch"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown checkpoint name" in bad.stderr and "Traceback" not in bad.stderr
