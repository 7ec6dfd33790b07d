"""Real ComfyUI server for the tests in this folder (marked comfyui / browser).

COMFYUI_DIR names a ComfyUI checkout and COMFYUI_PYTHON the interpreter that runs it (default: this
one); without COMFYUI_DIR every test here is skipped with the reason printed. The server runs on
loopback with a temporary base directory: the pack is symlinked into its custom_nodes, the shared tiny
weights are linked into its models folders in the layout the nodes expect.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
PACK_NAME = "ComfyUI-GenRefocus"
START_TIMEOUT = float(os.environ.get("COMFY_START_TIMEOUT", "240"))
RUN_TIMEOUT = float(os.environ.get("COMFY_RUN_TIMEOUT", "600"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ui_to_api import convert  # noqa: E402


def comfy_dir() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    return Path(d) if d else None


def pytest_collection_modifyitems(config, items):
    if comfy_dir() is not None:
        return
    reason = "COMFYUI_DIR is not set (it names a ComfyUI checkout; COMFYUI_PYTHON its interpreter)"
    for item in items:
        if "comfyui" in item.keywords or "browser" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen):
        self.base, self.port, self.proc = base, port, proc
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = base / "server.log"

    # -------------------------------------------------------------- http
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str):
        st, body = self.request("GET", path)
        assert st == 200, f"GET {path}: HTTP {st}: {body[:500]!r}"
        return json.loads(body)

    def object_info(self) -> dict:
        if not hasattr(self, "_object_info"):
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def post_prompt(self, prompt: dict):
        st, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        return st, json.loads(body or b"{}")

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            h = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if h and (h["status"].get("completed") or h["status"].get("status_str") == "error"):
                return h
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI died (exit {self.proc.returncode}); log tail:\n{self.log_tail()}")
            time.sleep(0.25)
        self.request("POST", "/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = RUN_TIMEOUT) -> dict:
        st, resp = self.post_prompt(prompt)
        assert st == 200, f"/prompt rejected the graph (HTTP {st}): {json.dumps(resp)[:3000]}"
        return self.wait(resp["prompt_id"], timeout)

    def view(self, item: dict) -> bytes:
        q = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        st, data = self.request("GET", f"/view?{q}")
        assert st == 200, f"/view {item}: HTTP {st}"
        return data

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def workflow_api(self, name: str) -> dict:
        ui = json.loads((WORKFLOWS / name).read_text())
        return convert(ui, self.object_info())


def _place_models(models: Path, tiny: Path, depth_pro_builder) -> None:
    """The shared tiny weights in the folders (and file names) the nodes and workflows use."""
    layout = {
        "diffusion_models/genrefocus-tiny-flux.safetensors": tiny / "transformer.safetensors",
        "vae/genrefocus-tiny-ae.safetensors": tiny / "vae.safetensors",
        "genrefocus/deblurNet.safetensors": tiny / "deblurNet.safetensors",
        "genrefocus/bokehNet.safetensors": tiny / "bokehNet.safetensors",
        "genrefocus/prompt_embeds.safetensors": tiny / "prompt_embeds.safetensors",
    }
    for rel, src in layout.items():
        dest = models / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            os.symlink(src, dest)
    depth_pro_builder(models / "depth_pro")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_dir):
    cdir = comfy_dir()
    if cdir is None:
        pytest.skip("COMFYUI_DIR is not set")
    if not (cdir / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={cdir} has no main.py")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = tmp_path_factory.mktemp("comfy-base")
    for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / d).mkdir(exist_ok=True)
    os.symlink(ROOT, base / "custom_nodes" / PACK_NAME)
    from tiny_depth_pro import build_tiny_depth_pro
    _place_models(base / "models", tiny_dir, build_tiny_depth_pro)
    port = _free_port()
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GENREFOCUS_MODELS_DIR", None)
    logf = open(base / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=cdir, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    server = ComfyServer(base, port, proc)
    try:
        end = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if server.request("GET", "/object_info", timeout=10)[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > end:
                pytest.fail(f"ComfyUI not ready in {START_TIMEOUT} s:\n{server.log_tail()}")
            time.sleep(1)
        log = server.log_path.read_text(errors="replace")
        assert f"(IMPORT FAILED): {base / 'custom_nodes' / PACK_NAME}" not in log, server.log_tail()
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        logf.close()
        if os.environ.get("GENREFOCUS_KEEP_COMFY_LOG"):
            shutil.copy(base / "server.log", os.environ["GENREFOCUS_KEEP_COMFY_LOG"])
