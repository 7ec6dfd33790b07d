"""Real ComfyUI server for the tests in this folder (marked comfyui / browser).

COMFYUI_DIR names a ComfyUI checkout and COMFYUI_PYTHON the interpreter that runs it (default: this
one); without COMFYUI_DIR every test here is skipped with the reason printed. The server runs on
loopback with a temporary base directory: the pack is symlinked into its custom_nodes, the shared tiny
weights are linked into its models folders in the layout the nodes expect, and written as the files of
ComfyUI's own loaders (native_flux_setup.py; with COMFYUI_GGUF_DIR also ComfyUI-GGUF and GGUF files).
"""
from __future__ import annotations

import contextlib
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
INPUT_SIZE = (120, 168)  # H, W of input/example.png: not multiples of 16, so padding and the crop back run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_flux_setup import NATIVE_FILES, install_native_flux, widget_name  # noqa: E402
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

    def post_prompt(self, prompt: dict, client_id: str | None = None):
        st, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})
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

    def run(self, prompt: dict, timeout: float = RUN_TIMEOUT, client_id: str | None = None) -> dict:
        st, resp = self.post_prompt(prompt, client_id)
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

    def workflow_api(self, name: str, tiny: bool = False) -> dict:
        """A shipped workflow in API format; tiny=True: on the tiny weights (file names swapped, the FLUX
        text encoder replaced by the stored prompt embeddings, which the tiny set provides)."""
        ui = json.loads((WORKFLOWS / name).read_text())
        api = convert(ui, self.object_info())
        if tiny:
            for nid, node in list(api.items()):
                for (cls, name_), value in TINY_NAMES.items():
                    if node["class_type"] == cls and name_ in node["inputs"]:
                        node["inputs"][name_] = value
                if node["class_type"] == "GenRefocusLoadModel":
                    node["inputs"].pop("clip", None)
                if node["class_type"] == "CLIPTextEncode":  # the tiny text encoders cannot load in ComfyUI
                    api[nid] = {"class_type": "TinyFluxPromptConditioning", "inputs": {"stage": "deblur"}}
            api = {k: v for k, v in api.items() if v["class_type"] != "DualCLIPLoader"}
        return api

    def outputs_of(self, history: dict, node_id: str) -> list[dict]:
        return history.get("outputs", {}).get(str(node_id), {}).get("images", [])

    def image(self, item: dict):
        import io

        import numpy as np
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(self.view(item))).convert("RGB"))


def errors_of(history: dict) -> list[dict]:
    return [m for kind, m in history["status"].get("messages", []) if kind == "execution_error"]


class WebSocketMessages:
    """Minimal RFC 6455 client for ComfyUI's /ws (stdlib only): collects the JSON messages
    (progress, executing, ...) sent to one client id in a background thread."""

    def __init__(self, port: int):
        import base64
        import threading
        self.client_id = str(uuid.uuid4())
        self.messages: list[dict] = []
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def _read(self):
        import struct
        try:
            while True:
                b0, b1 = self._recv(2)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._recv(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._recv(8))[0]
                mask = self._recv(4) if b1 & 0x80 else None
                data = self._recv(length)
                if mask:
                    data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
                if opcode == 8:
                    return
                if opcode == 1:
                    self.messages.append(json.loads(data))
        except (OSError, ConnectionError, ValueError):
            return

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# Shipped workflows name the real files; the tests run them on the shared tiny weights under these names.
TINY_NAMES = {
    ("UNETLoader", "unet_name"): widget_name(NATIVE_FILES["unet"]),
    ("VAELoader", "vae_name"): widget_name(NATIVE_FILES["vae"]),
    ("GenRefocusLoadModel", "prompt_embeddings"): "prompt_embeds.safetensors",
    ("GenRefocusLoadDepthPro", "model_name"): "depth-pro-tiny/model.safetensors",
}
# Names the shipped workflows use for files the tiny set does not have: empty placeholders, so that the
# unmodified workflows pass the server's validation (loading them fails at run time, as it should).
PLACEHOLDERS = ["diffusion_models/flux1-dev.safetensors", "vae/ae.safetensors", "text_encoders/clip_l.safetensors",
                "text_encoders/t5xxl_fp16.safetensors", "depth_pro/depth_pro.pt"]


def _place_models(models: Path, tiny: Path, depth_pro_builder) -> None:
    """The shared tiny weights in the folders (and names) the nodes expect: diffusers component folders
    (config.json beside the weights) for FLUX and its VAE, LoRAs and prompt embeddings in genrefocus/,
    a tiny Depth Pro in the Hugging Face layout, and a LoRA posing as a FLUX file (wrong family)."""
    links = {
        "genrefocus/deblurNet.safetensors": tiny / "deblurNet.safetensors",
        "genrefocus/bokehNet.safetensors": tiny / "bokehNet.safetensors",
        "genrefocus/prompt_embeds.safetensors": tiny / "prompt_embeds.safetensors",
    }
    for rel, src in links.items():
        dest = models / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not src.exists():
            pytest.fail(f"shared tiny weights missing: {src}")
        os.symlink(src, dest)
    for rel in PLACEHOLDERS:
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_bytes(b"")
    depth_pro_builder(models / "depth_pro")


@contextlib.contextmanager
def running_server(base: Path, extra_env: dict | None = None):
    """Start ComfyUI (COMFYUI_DIR, COMFYUI_PYTHON) on a free loopback port with `base` as its base
    directory, wait for /object_info, yield a ComfyServer, stop it (its own process group) afterwards."""
    cdir = comfy_dir()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    port = _free_port()
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
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
        for pack in (base / "custom_nodes").iterdir():
            assert f"(IMPORT FAILED): {pack}" not in log, f"{pack.name} failed to import (its requirements " \
                f"belong in COMFYUI_PYTHON):\n{server.log_tail()}"
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


def make_base(tmp_path_factory, name: str = "comfy-base") -> Path:
    """A fresh ComfyUI base directory with the pack linked into custom_nodes."""
    cdir = comfy_dir()
    if cdir is None:
        pytest.skip("COMFYUI_DIR is not set")
    if not (cdir / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={cdir} has no main.py")
    base = tmp_path_factory.mktemp(name)
    for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / d).mkdir(exist_ok=True)
    os.symlink(ROOT, base / "custom_nodes" / PACK_NAME)
    return base


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_dir):
    base = make_base(tmp_path_factory)
    from tiny_depth_pro import build_tiny_depth_pro
    _place_models(base / "models", tiny_dir, build_tiny_depth_pro)
    env = install_native_flux(base, tiny_dir)
    with running_server(base, extra_env=env) as server:
        yield server


@pytest.fixture(scope="session")
def server(comfy_server):
    """The server with input/example.png (the name the shipped workflows load): the test scene."""
    sys.path.insert(0, str(ROOT))
    from genrefocus_core.basics.images import save_image
    from genrefocus_core.basics.scene import make_scene
    image, _ = make_scene(*INPUT_SIZE, seed=3)
    save_image(image[0], comfy_server.base / "input" / "example.png")
    return comfy_server
