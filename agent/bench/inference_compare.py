"""`bench inference`: repeated runs and their spread, what the slowest turns waited on, and the
like-for-like comparison of `serve-model` against vLLM.

Like for like (`--compare-vllm`): both servers run at once, each a process of its own, and are
reached the same way: the OpenAI chat-completions wire over TCP loopback (audio as base64 WAV,
answers streamed), by the same client (`agent.inference.openai.OpenAIBackend`), on the same
checkpoint saved once to one directory, with the same threads (`OMP_NUM_THREADS` for our worker,
`VLLM_CPU_OMP_THREADS_BIND` for vLLM's engine on the CPU), through the same seeded sessions.
Neither gets a speculative prefill: vLLM has no equivalent, so the client waits the same lead
before each commit and sends nothing early. Runs alternate between the two servers
(`--repeats`), so drift in the machine's load hits both; every figure is reported per run
(median, min, max over runs) and pooled.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.bench.procs import stop_process

WIRE = ("OpenAI chat completions over HTTP on TCP loopback: audio as base64 WAV input_audio parts, "
        "answers streamed as SSE")
CLIENT = "agent.inference.openai.OpenAIBackend (the same instance type, one per server)"
NO_SPECULATION = ("neither: vLLM has no speculative prefill, so the client waits the same lead before "
                  "each commit and sends nothing early")


# ---- spread over repeated runs ---------------------------------------------------------------

def merge(runs: list[Any]) -> Any:
    """One `Result` holding every run's turns (pooled percentiles), seconds summed."""
    from agent.bench.inference import Result

    total = Result()
    for r in runs:
        total.ttft += r.ttft
        total.itl += r.itl
        total.tokens += r.tokens
        total.seconds += r.seconds
        total.records += r.records
    return total


def spread(runs: list[Any]) -> dict[str, Any]:
    """Each figure per run: median, min and max over the runs."""
    from agent.bench.inference import pct, rounded

    out: dict[str, Any] = {"runs": len(runs)}
    for key, q in (("ttft_p50_s", 50), ("ttft_p95_s", 95), ("ttft_p99_s", 99)):
        values = [v for v in (pct(r.ttft, q) for r in runs) if v is not None]
        out[key] = {"median": rounded(statistics.median(values)), "min": rounded(min(values)),
                    "max": rounded(max(values))} if values else None
    tps = [r.tokens_per_s for r in runs]
    out["tokens_per_s"] = {"median": round(statistics.median(tps), 1), "min": round(min(tps), 1),
                           "max": round(max(tps), 1)} if tps else None
    return out


def row(runs: list[Any], comparison: str) -> dict[str, Any]:
    """A table row: pooled figures over the runs, their spread, and which comparison it is."""
    return {**merge(runs).row(), "spread": spread(runs), "comparison": comparison}


def tail(result: Any, q: float = 95) -> dict[str, Any] | None:
    """What the turns at or above the TTFT percentile `q` waited on, against all turns (medians):
    the engine's queue (submit → admission) and prefill (admission → first token), the rest of
    the delivered TTFT (pipe, event loop, wire), prompt and reused tokens, and the share that
    continued their speculative prefill."""
    from agent.bench.inference import pct, rounded

    records = [r for r in result.records if r["ttft"] is not None]
    if not records:
        return None
    cut = pct([r["ttft"] for r in records], q)

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        def med(key: str) -> float | None:
            values = [r[key] for r in rs if r.get(key) is not None]
            return rounded(statistics.median(values)) if values else None
        return {"requests": len(rs), "ttft_s": med("ttft"), "queue_s": med("queue"), "prefill_s": med("prefill"),
                "outside_engine_s": med("outside"), "prompt_tokens": med("prompt_tokens"),
                "reused_tokens": med("reused_tokens"),
                "continued_speculation": round(sum(r["speculative"] for r in rs) / len(rs), 2)}

    return {"percentile": q, "tail": summary([r for r in records if cut is not None and r["ttft"] >= cut]),
            "all": summary(records)}


# ---- the two servers -----------------------------------------------------------------------

def free_port() -> int:
    from agent.bench.vllm_server import free_port as port

    return port()


class ModelServerProcess:
    """`voice-agent serve-model` on TCP loopback, a process of its own (as vLLM is)."""

    def __init__(self, model_dir: str, *, sessions: int, threads: int, log_path: str | None = None,
                 gpu_memory_utilization: float | None = None) -> None:
        self.model_dir, self.sessions, self.threads = model_dir, sessions, threads
        self.port = free_port()
        self.log_path = log_path
        self.gpu_memory_utilization = gpu_memory_utilization
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "agent.cli", "serve-model", "--model", self.model_dir, "--listen",
                f"tcp://127.0.0.1:{self.port}", "--workers", "1", "--max-batch", str(max(self.sessions, 1)),
                "--max-queue", str(4 * self.sessions + 8)]

    def __enter__(self) -> ModelServerProcess:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        if self.gpu_memory_utilization is not None:
            env["VOICE_AGENT_GPU_MEMORY_UTILIZATION"] = str(self.gpu_memory_utilization)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 900
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"serve-model exited with {self.process.returncode} before it served")
            if time.monotonic() > deadline:
                stop_process(self.process)
                raise TimeoutError("serve-model did not serve within 900 s")
            time.sleep(0.3)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def worker_threads(self) -> int | None:
        """OMP_NUM_THREADS of its inference worker as that process sees it (torch reads it at import)."""
        from agent.bench.soak import _proc_tree

        assert self.process is not None
        for pid in _proc_tree(self.process.pid):
            if pid == self.process.pid:
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"OMP_NUM_THREADS="):
                    return int(item.split(b"=", 1)[1])
        return None

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process(self.process)


def _checkpoint(model: str, directory: str) -> str:
    """The checkpoint both servers load: the model's own directory, or the model saved there once."""
    from agent.inference import models

    if Path(model).is_dir():
        return model
    return str(models.save(model, Path(directory) / "model"))


def like_for_like(args: Any, sessions: list[Any], one: list[Any]) -> dict[str, Any]:
    """serve-model and vLLM, both up at once, the same workload through each, alternating."""
    from agent.bench.inference import measure_wire, model_label
    from agent.bench.vllm_server import VLLMServer

    gpu = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        checkpoint = _checkpoint(args.model, tmp)
        saved_s = time.perf_counter() - started
        clips = max(args.history_turns, args.turns * -(-int(args.audio[1]) // 30))
        share = args.gpu_share if gpu else None
        with ModelServerProcess(checkpoint, sessions=args.sessions, threads=args.threads,
                                log_path=f"{tmp}/serve-model.log", gpu_memory_utilization=share) as ours, \
                VLLMServer(checkpoint, max_audios=clips, threads=None if gpu else args.threads,
                           log_path=f"{tmp}/vllm.log", device="cuda" if gpu else "cpu",
                           gpu_memory_utilization=share) as vllm:
            try:
                runs = asyncio.run(measure_wire({"serve_model": ours.url, "vllm": vllm.url}, args, sessions, one))
            except Exception:
                for name in ("serve-model", "vllm"):  # the servers' last words, before their logs go
                    text = Path(f"{tmp}/{name}.log").read_text(errors="replace")[-1500:]
                    print(f"--- {name} log, last lines:\n{text}", file=sys.stderr)
                raise
            worker_threads = ours.worker_threads()
    points = []
    for n, key in ((1, "one"), (args.sessions, "load")):
        points.append({"sessions": n, **{name: row(r[key], "like_for_like") for name, r in runs.items()}})
    from agent.bench.inference import _ratio

    vllm_threads = None if gpu else args.threads
    return {
        "comparison": "like_for_like: serve-model against vLLM over the same wire",
        "wire": WIRE, "client": CLIENT,
        "checkpoint": (f"{model_label(args.model)}: one checkpoint directory"
                       + (f" (saved once, {saved_s:.1f} s)" if checkpoint != args.model else "") + ", loaded by both servers"),
        "arrival": f"seed {args.seed}: the same sessions, turns, pauses and commit times for both",
        "speculative_prefill": NO_SPECULATION,
        "server": "vLLM (--enable-prefix-caching) via " + ("VLLM_PYTHON" if os.environ.get("VLLM_PYTHON") else ".venv-vllm"),
        "threads": {"serve_model_worker": worker_threads, "vllm_engine": vllm_threads},
        "threads_equal": None if gpu else worker_threads == vllm_threads == args.threads,
        "repeats": args.repeats,
        "points": points,
        "turn20_over_turn1": {name: _ratio(r["history"]) for name, r in runs.items()},
    }
