"""Start and drive a real ComfyUI server (the one scripts/bootstrap.sh builds) with this pack loaded.

Used by the demo and the integration tests: a fresh base directory per server (models/, input/, output/ under
it), the pack linked into its custom_nodes, loopback only, a free port, the in-memory database.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VRAMWISE_CACHE", REPO / ".cache"))
COMFY = CACHE / "ComfyUI"
PYTHON = CACHE / "venv" / "bin" / "python"
PACK_NAME = "comfyui-vramwise"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(RuntimeError):
    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.details = details


class ComfyServer:
    """One ComfyUI process. Use as a context manager or call start()/stop()."""

    def __init__(self, base_dir: Path | None = None, extra_args: list[str] | None = None) -> None:
        self.base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="vramwise-comfy-"))
        self.port = free_port()
        self.extra_args = list(extra_args or [])
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self._ws = None
        self._ws_thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def log_path(self) -> Path:
        return self.base / "comfy.log"

    def prepare(self) -> None:
        for sub in ("custom_nodes", "user/default", "models/diffusers", "input", "output"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if not (COMFY / "main.py").is_file():
            raise RuntimeError(f"No ComfyUI at {COMFY}: run scripts/bootstrap.sh first.")
        self.prepare()
        cmd = [
            str(PYTHON), str(COMFY / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
            "--disable-api-nodes", "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME,
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    self._connect_ws()
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and requests.get(self.url + "/system_stats", timeout=5).ok

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- websocket ------------------------------------------------------------------------------
    def _connect_ws(self) -> None:
        import websocket

        url = f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}"
        self._ws = websocket.create_connection(url, timeout=10)
        # The connect timeout would otherwise also apply to recv: a quiet minute (a long run with no progress,
        # or another client driving the server) would end the listener and every later event would be missed.
        self._ws.settimeout(None)

        def pump() -> None:
            while True:
                try:
                    message = self._ws.recv()
                except Exception:
                    if self.proc is None or self.proc.poll() is not None or self._stopping:
                        return
                    try:  # the connection dropped while the server lives on: listen again
                        time.sleep(0.2)
                        self._ws = websocket.create_connection(url, timeout=10)
                        self._ws.settimeout(None)
                    except Exception:
                        return
                    continue
                if isinstance(message, bytes):
                    event = {"type": "binary_preview", "data": {"size": len(message)}}
                else:
                    try:
                        event = json.loads(message)
                    except ValueError:
                        continue
                with self._events_lock:
                    self.events.append(event)

        self._ws_thread = threading.Thread(target=pump, daemon=True)
        self._ws_thread.start()

    def events_for(self, prompt_id: str) -> list[dict[str, Any]]:
        with self._events_lock:
            return [e for e in self.events if (e.get("data") or {}).get("prompt_id") == prompt_id]

    def progress(self, prompt_id: str, node: str) -> list[dict[str, Any]]:
        """The progress messages ({value, max, ...}) one node of a prompt sent, in order."""
        return [e["data"] for e in self.events_for(prompt_id) if e.get("type") == "progress" and e["data"].get("node") == node]

    def wait_for_event(self, prompt_id: str, kind: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e in self.events_for(prompt_id):
                if e.get("type") == kind:
                    return e
            time.sleep(0.05)
        raise TimeoutError(f"no '{kind}' event for {prompt_id} within {timeout}s")

    # -- HTTP API -------------------------------------------------------------------------------
    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info").json()

    def queue(self, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = requests.post(self.url + "/prompt", json=body, timeout=30)
        data = r.json()
        if r.status_code != 200 or data.get("node_errors"):
            raise PromptFailed(f"prompt rejected ({r.status_code}): {json.dumps(data)[:2000]}", data)
        return data["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any]:
        return self.get(f"/history/{prompt_id}").json().get(prompt_id, {})

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.history(prompt_id)
            if entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
                self._wait_for_final_event(prompt_id)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log_text()[-3000:]}")

    def _wait_for_final_event(self, prompt_id: str, timeout: float = 15.0) -> None:
        """History can say done before the websocket has delivered the run's last messages; wait for them."""
        final = {"execution_success", "execution_error", "execution_interrupted"}
        deadline = time.time() + timeout
        while self._ws is not None and time.time() < deadline:
            if any(e.get("type") in final for e in self.events_for(prompt_id)):
                return
            time.sleep(0.05)

    def run(self, prompt: dict[str, Any], timeout: float = 300.0, extra_data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue ``prompt`` and return its finished history entry (whatever the outcome)."""
        return self.wait(self.queue(prompt, extra_data), timeout)

    def interrupt(self) -> None:
        requests.post(self.url + "/interrupt", timeout=10)

    def upload_image(self, path: Path) -> str:
        """Copy a picture into the input folder and return the name LoadImage takes."""
        dest = self.input_dir / path.name
        shutil.copyfile(path, dest)
        return dest.name


def status_messages(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(m[0], m[1]) for m in entry.get("status", {}).get("messages", [])]


def execution_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    for kind, data in status_messages(entry):
        if kind == "execution_error":
            return data
    return None


def main(argv: list[str]) -> int:
    """`python scripts/comfy_harness.py serve [BASE_DIR]`: run a server in the foreground until Ctrl-C."""
    if len(argv) >= 1 and argv[0] == "serve":
        server = ComfyServer(Path(argv[1]) if len(argv) > 1 else None).start()
        print(f"ComfyUI with {PACK_NAME} at {server.url} (base {server.base}); Ctrl-C stops it", flush=True)
        try:
            while server.proc and server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        return 0
    print(main.__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
