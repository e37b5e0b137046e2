"""Flower against a real worker: workers, queue lengths, a running job's live progress, auth, metrics, the UI.

Each scenario starts a real worker, then a real ``celery -A tasks flower`` (as ``make up`` does, with
``FLOWER_BASIC_AUTH=admin:secret``), enqueues a job long enough to watch it run and cancels it at the end.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.browser import CHROMIUM_INSTALL, chromium_binary, render
from tests.conftest import ARTIFACTS
from tests.services import REPO, free_port, stop_pid, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "admin", "secret"
WORKER = "gpu0@test"
# Far longer than the checks take, even on a GPU (the tiny hero does a few steps a second on a busy CPU);
# each test cancels it when done, so its length costs nothing. Few checkpoints: less disk work meanwhile.
LONG_JOB_STEPS = 5000
LONG_JOB = ["--set", f"max_steps={LONG_JOB_STEPS}", "--set", "max_length=128", "--set", "save_steps=1000"]
# The one-line summary tasks.train._ProgressEvents puts in the task's result.
SUMMARY = re.compile(r"step (\d+)/(\d+) · loss \d+\.\d{4} · \d+ tok/s · ETA \d+ s")


@dataclass
class Response:
    status: int
    body: str
    content_type: str

    def json(self):
        return json.loads(self.body)


class FlowerProcess:
    """A real ``celery -A tasks flower`` on a free loopback port, stopped by its pid."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path, self.port = env, log_path, free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> FlowerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower", "--address=127.0.0.1", f"--port={self.port}"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        # /healthcheck answers without credentials once the HTTP server is up.
        wait_until(lambda: self.proc.poll() is not None or self.get("/healthcheck", auth=None).status == 200, 60,
                   interval_s=0.2, what="Flower to answer /healthcheck")
        if self.proc.poll() is not None:
            raise RuntimeError(f"flower exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def url(self, path: str, credentials: bool = False) -> str:
        userinfo = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}{path}"

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> Response:
        """GET ``path``; an HTTP error status is returned, not raised (status 0: nothing answered)."""
        headers = {}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        request = urllib.request.Request(self.url(path), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return Response(resp.status, resp.read().decode(), resp.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.read().decode(errors="replace"), exc.headers.get("Content-Type", ""))
        except OSError:
            return Response(0, "", "")

    def task_info(self, task_id: str) -> dict | None:
        resp = self.get(f"/api/task/info/{urllib.parse.quote(task_id)}")
        return resp.json() if resp.status == 200 else None


@pytest.fixture
def start_flower(guild_env, tmp_path):
    """Start Flower with basic auth on (after the worker, as ``make up`` does); stopped by its pid at the end."""
    started: list[FlowerProcess] = []

    def start() -> FlowerProcess:
        flower = FlowerProcess({**guild_env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}, tmp_path / "flower.log")
        started.append(flower)
        return flower.start()

    yield start
    for flower in started:
        flower.stop()


@pytest.fixture
def cancel_at_end(run_cli, store):
    """Jobs to cancel at the end of the test, so that the worker's warm shutdown does not wait for them."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        if store.get(job_id).status.value in ("queued", "processing"):
            run_cli("jobs", "cancel", job_id)


def _enqueue(run_cli, path: Path, *args: str) -> str:
    out = run_cli("enqueue", str(path), *args, "--json")
    assert out.returncode == 0, out.stderr
    [job] = json.loads(out.stdout)
    return job["id"]


def _wait_for_progress(flower: FlowerProcess, job_id: str, worker) -> dict:
    """Wait until Flower shows ``job_id`` in state PROGRESS with a step summary; returns its task info."""

    def progressing():
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.log()[-3000:]}")
        info = flower.task_info(job_id)
        return info if info and info.get("state") == "PROGRESS" and SUMMARY.search(info.get("result") or "") else None

    # Starting a job loads the hero first: seconds on an idle machine, more on a busy CI runner.
    try:
        return wait_until(progressing, 180, interval_s=0.3, what=f"Flower to show {job_id} in PROGRESS")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; Flower has {flower.task_info(job_id)}\nworker log:\n{worker.log()[-3000:]}"
                             f"\nflower log:\n{flower.log()[-2000:]}") from None


def _metric(body: str, name: str, **labels: str) -> float | None:
    """The value of the Prometheus sample ``name`` with (at least) these labels, or None when there is none."""
    for line in body.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
        if labels.items() <= found.items():
            return float(line.rsplit(" ", 1)[1])
    return None


def _step(info: dict) -> tuple[int, int]:
    """(step, total steps) from a task's progress summary; (0, 0) when its result is not one."""
    found = SUMMARY.search(info.get("result") or "")
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def test_api_shows_the_worker_queue_lengths_and_a_running_jobs_progress(
        run_cli, start_worker, start_flower, store, cancel_at_end, tmp_path):
    worker = start_worker(WORKER)
    flower = start_flower()

    # ---- workers: Flower inspects them (broadcast); the worker consumes high, normal and low ----------------
    def listed():
        resp = flower.get("/api/workers?refresh=1")
        return resp.json() if resp.status == 200 and WORKER in resp.json() else None

    workers = wait_until(listed, 30, interval_s=0.5, what=f"/api/workers to list {WORKER}")
    assert {q["name"] for q in workers[WORKER]["active_queues"]} == {"high", "normal", "low"}

    # ---- a running job: state PROGRESS and the one-line summary as its result ------------------------------
    job_id = _enqueue(run_cli, REPO / "examples" / "chat_small.jsonl", "--priority", "high", *LONG_JOB)
    cancel_at_end.append(job_id)
    info = _wait_for_progress(flower, job_id, worker)
    step, total = _step(info)
    assert 1 <= step <= total == LONG_JOB_STEPS, info["result"]
    assert info["worker"] == WORKER and info["name"] == "guild.train" and info["routing_key"] == "high"
    # Live: the summary follows the training (an event at most once a second).
    later = wait_until(lambda: (i := flower.task_info(job_id)) and _step(i)[0] > step and i, 30, interval_s=0.5,
                       what="the step shown by Flower to advance")
    assert later["state"] == "PROGRESS"

    # ---- queue lengths: Flower reads them from Redis itself (no --broker_api needed) -----------------------
    # The single worker is busy (one message reserved, acks late), so these wait in their lists.
    waiting = {}
    for name, priority in (("a", "normal"), ("b", "low"), ("c", "low")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"prompt": f"queue length check {name}", "response": priority}) + "\n")
        waiting[name] = _enqueue(run_cli, path, "--priority", priority, "--set", "max_steps=2")
        cancel_at_end.append(waiting[name])
    resp = flower.get("/api/queues/length")
    assert resp.status == 200, resp.body
    lengths = {q["name"]: q["messages"] for q in resp.json()["active_queues"]}
    assert lengths == {"high": 0, "normal": 1, "low": 2}

    # ---- auth: basic auth guards the UI and the API -----------------------------------------------------
    for path in ("/api/workers", f"/api/task/info/{urllib.parse.quote(job_id)}", "/", "/broker"):
        assert flower.get(path, auth=None).status == 401, path
        assert flower.get(path, auth=(USER, "wrong")).status == 401, path
    assert flower.get("/broker").status == 200

    # ---- Prometheus metrics: task-progress events counted per worker -------------------------------------
    metrics = flower.get("/metrics")
    assert metrics.status == 200 and metrics.content_type.startswith("text/plain")
    progress_events = _metric(metrics.body, "flower_events_total", task="guild.train", type="task-progress",
                              worker=WORKER)
    assert progress_events is not None and progress_events >= 2, metrics.body[-2000:]

    # ---- the end: cancelled on request; the task's final event replaces PROGRESS --------------------------
    for job in (job_id, *waiting.values()):
        assert run_cli("jobs", "cancel", job).returncode == 0
    wait_until(lambda: store.get(job_id).status.value == "cancelled", 60, interval_s=0.3, what="the job cancelled")
    final = wait_until(lambda: (i := flower.task_info(job_id)) and i["state"] == "SUCCESS" and i, 30,
                       interval_s=0.3, what="Flower to show the task's final state")
    assert "'action': 'cancelled'" in final["result"], final["result"]


@pytest.mark.skipif(chromium_binary() is None, reason=f"chromium is not installed (install: {CHROMIUM_INSTALL})")
def test_task_page_shows_the_running_jobs_step_in_chromium(run_cli, start_worker, start_flower, cancel_at_end,
                                                           tmp_path):
    worker = start_worker(WORKER)
    flower = start_flower()
    job_id = _enqueue(run_cli, REPO / "examples" / "chat_small.jsonl", "--priority", "high", *LONG_JOB)
    cancel_at_end.append(job_id)
    _wait_for_progress(flower, job_id, worker)

    # Flower renders the task page on the server, so the DOM Chromium dumps is the page a person sees.
    screenshot = ARTIFACTS / "flower-task.png"
    dom = render(flower.url(f"/task/{urllib.parse.quote(job_id)}", credentials=True), screenshot=screenshot,
                 window=(1280, 1600))
    (ARTIFACTS / "flower-task.html").write_text(dom)
    assert job_id in dom
    summary = SUMMARY.search(dom)
    assert summary, dom[-3000:]
    assert int(summary.group(2)) == LONG_JOB_STEPS
    assert "PROGRESS" in dom and WORKER in dom
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and screenshot.stat().st_size > 20_000

    # The broker page: the three queues' lengths, read from Redis by Flower itself. The worker is busy, so a
    # low job waits in its list (the running job's message is reserved, no longer in "high").
    path = tmp_path / "waiting.jsonl"
    path.write_text(json.dumps({"prompt": "waiting in low", "response": "yes"}) + "\n")
    cancel_at_end.append(_enqueue(run_cli, path, "--priority", "low", "--set", "max_steps=2"))
    broker = render(flower.url("/broker", credentials=True), screenshot=ARTIFACTS / "flower-broker.png",
                    window=(1280, 800))
    for queue, messages in (("high", 0), ("normal", 0), ("low", 1)):
        assert re.search(rf"<td>{queue}</td>\s*<td[^>]*>{messages}</td>", broker), broker[-3000:]


def _refusal(extra_args: list[str], env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Run ``celery -A tasks flower`` on a free port; if it starts listening instead of exiting, stop it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "flower", *extra_args, f"--port={port}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or _listening(port), timeout_s, interval_s=0.1,
                   what="flower to exit or listen")
    finally:
        listening = proc.poll() is None
        stop_pid(proc)
        out, err = proc.communicate()
    if listening:
        pytest.fail(f"flower started on port {port} instead of refusing:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("address_args", [
    pytest.param(["--address=0.0.0.0"], id="all-ipv4"),
    pytest.param(["--address=::"], id="all-ipv6"),
    pytest.param(["--address="], id="empty"),  # Flower binds every interface for an empty address
])
def test_refuses_a_non_loopback_address_without_basic_auth(guild_env, address_args):
    env = {k: v for k, v in guild_env.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_ADDRESS")}
    done = _refusal(address_args, env)
    assert done.returncode != 0
    assert "FLOWER_BASIC_AUTH" in done.stderr, done.stderr


def test_metrics_need_credentials_when_basic_auth_is_on(start_flower):
    flower = start_flower()
    assert flower.get("/metrics").status == 200
    assert flower.get("/metrics", auth=None).status == 401
