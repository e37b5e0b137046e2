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

from jobs import keys
from jobs.queues import celery_key
from tasks.publish import TASK_NAME
from tests.browser import CHROMIUM_INSTALL, chromium_binary, render
from tests.conftest import ARTIFACTS
from tests.services import REPO, free_port, stop_pid, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "admin", "secret-flower-pw"  # tasks.flower_guard wants 12+ characters
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

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()):
        self.env, self.log_path, self.port, self.args = env, log_path, free_port(), args
        self.proc: subprocess.Popen | None = None

    def start(self) -> FlowerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower", "--address=127.0.0.1", f"--port={self.port}",
             *self.args],
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

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD), data: dict | None = None) -> Response:
        """GET ``path`` (POST ``data`` as JSON when given); an HTTP error status is returned, not raised (status 0:
        nothing answered)."""
        headers = {}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        body = None
        if data is not None:
            body, headers["Content-Type"] = json.dumps(data).encode(), "application/json"
        request = urllib.request.Request(self.url(path), data=body, headers=headers)
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

    def start(env: dict | None = None, args: tuple[str, ...] = ()) -> FlowerProcess:
        flower = FlowerProcess({**guild_env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}", **(env or {})},
                               tmp_path / "flower.log", args)
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


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _refusals(calls: list[tuple[list[str], dict[str, str]]], timeout_s: float = 90) \
        -> list[subprocess.CompletedProcess]:
    """Start ``celery -A tasks flower ARGS`` for every call at once (free ports); each must exit, never listen."""
    procs = []
    for args, env in calls:
        port = free_port()
        procs.append((port, subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)))
    try:
        wait_until(lambda: all(p.poll() is not None or _listening(port) for port, p in procs), timeout_s,
                   interval_s=0.2, what="every flower to exit or listen")
    finally:
        listening = [port for port, p in procs if p.poll() is None]
        for _, p in procs:
            stop_pid(p)
    done = []
    for _, p in procs:
        out, err = p.communicate()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    if listening:
        pytest.fail(f"flower started on port(s) {listening} instead of refusing: "
                    f"{[d.stderr[-500:] for d in done if d.returncode is None or d.returncode < 0]}")
    return done


def test_flower_off_loopback_without_auth_is_refused_however_the_address_is_given(guild_env, tmp_path):
    """The guard reads the address Flower will bind (tasks.flower_guard), not sys.argv: none of these spellings
    gets past it (before, every one but --address=... bound 0.0.0.0 and served / with 200 and no auth)."""
    env = {k: v for k, v in guild_env.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_ADDRESS")}
    other_conf = tmp_path / "other_flowerconfig.py"
    other_conf.write_text("max_tasks = 1000\n")
    spellings = {
        "--address=0.0.0.0": ["--address=0.0.0.0"],
        "--address=::": ["--address=::"],
        "--address= (empty)": ["--address="],
        "-address=0.0.0.0": ["-address=0.0.0.0"],
        "---address=0.0.0.0": ["---address=0.0.0.0"],
        "a second --address": ["--address=127.0.0.1", "--address=0.0.0.0"],
        "--conf=other --address": [f"--conf={other_conf}", "--address=0.0.0.0"],
        "--conf=other (all interfaces)": [f"--conf={other_conf}"],
        "FLOWER_ADDRESS=0.0.0.0": [],
        "--unix_socket": [f"--unix_socket={tmp_path / 'flower.sock'}"],
    }
    calls = [(args, {**env, "FLOWER_ADDRESS": "0.0.0.0"} if not args else env) for args in spellings.values()]
    for what, done in zip(spellings, _refusals(calls)):
        assert done.returncode == 2, (what, done.stderr[-1500:])
        assert "error: refusing to start Flower on " in done.stderr and "without authentication" in done.stderr, \
            (what, done.stderr[-1500:])
        assert "Traceback" not in done.stderr, (what, done.stderr[-1500:])


def test_weak_or_empty_credentials_are_refused(guild_env):
    env = {k: v for k, v in guild_env.items() if k != "FLOWER_BASIC_AUTH"}
    weak = {":": "the user name is empty", "admin:": "the password is empty",
            "admin:short": "the password has 5 characters; it needs at least 12",
            "admin:pa,ss-long-enough-1": "so a password cannot hold a comma",
            "nocolon-at-all-long": "it has no ':' between user and password"}
    calls = [([], {**env, "FLOWER_BASIC_AUTH": value}) for value in weak]
    calls.append((["--basic_auth=admin:tooshort"], env))  # Flower's own option is checked the same way
    for (value, says), done in zip([*weak.items(), ("admin:tooshort", "the password has 8 characters")],
                                   _refusals(calls)):
        assert done.returncode == 2 and "error: " in done.stderr and says in done.stderr, (value, done.stderr[-800:])
        password = value.partition(":")[2]
        assert not password or password not in done.stderr, "a password was printed"


def test_flower_is_read_only_unless_the_operator_opts_in(start_flower, redis_client):
    """By default no task can be sent or revoked and no worker controlled; a send-task naming a queue after a Guild
    key used to turn that key into a list (WRONGTYPE for every later enqueue)."""
    redis_client.zadd(keys.JOBS_QUEUED, {"a-job": 1.0})
    flower = start_flower()
    poison = {"args": ["x"], "queue": keys.JOBS_QUEUED}
    for path in (f"/api/task/send-task/{TASK_NAME}", f"/api/task/async-apply/{TASK_NAME}",
                 "/api/task/revoke/some-id", "/api/worker/shutdown/gpu0@test", "/api/worker/pool/restart/gpu0@test"):
        resp = flower.get(path, data=poison)
        assert resp.status == 403 and "Read only" in resp.body, (path, resp.status, resp.body[:200])
    assert redis_client.type(keys.JOBS_QUEUED) == b"zset"
    assert [k.decode() for k in redis_client.scan_iter(match="*" + keys.JOBS_QUEUED)] == [keys.JOBS_QUEUED]


@pytest.mark.integration
def test_with_control_opted_in_a_bad_send_task_is_dead_lettered_and_guild_keys_are_out_of_reach(
        start_worker, start_flower, store, redis_client):
    """GUILD_FLOWER_CONTROL=1: Flower may send tasks. The message with time_limit "xx" (which killed every worker in
    turn) goes to the dead-letter list; a queue named after a Guild key lands under guild-celery:, not on the key."""
    redis_client.zadd(keys.JOBS_QUEUED, {"a-job": 1.0})
    worker = start_worker(WORKER)
    flower = start_flower(env={"GUILD_FLOWER_CONTROL": "1"})
    resp = flower.get(f"/api/task/send-task/{TASK_NAME}", data={"args": ["x"], "time_limit": "xx"})
    assert resp.status == 200, resp.body
    wait_until(lambda: store.dead_letter_count() == 1 or worker.proc.poll() is not None, 60,
               what="the message to be dead-lettered")
    assert worker.proc.poll() is None, worker.log()[-3000:]
    [letter] = store.dead_letters()
    assert letter.error.startswith("header 'timelimit' is ['xx', None]") and letter.queue == "normal"
    resp = flower.get(f"/api/task/send-task/{TASK_NAME}", data={"args": ["y"], "queue": keys.JOBS_QUEUED})
    assert resp.status == 200, resp.body
    assert redis_client.type(keys.JOBS_QUEUED) == b"zset"
    assert redis_client.llen(celery_key(keys.JOBS_QUEUED)) == 1  # a harmless list of kombu's own


def test_metrics_need_credentials_whichever_way_auth_is_given(start_flower, guild_env):
    flower = start_flower()
    assert flower.get("/metrics").status == 200
    assert flower.get("/metrics", auth=None).status == 401
    flower.stop()
    # Flower's own --basic_auth option instead of FLOWER_BASIC_AUTH: /metrics used to be open then.
    flower = start_flower(env={"FLOWER_BASIC_AUTH": ""}, args=(f"--basic_auth={USER}:{PASSWORD}",))
    assert flower.get("/metrics").status == 200
    assert flower.get("/metrics", auth=None).status == 401


def test_flower_exits_with_the_cause_when_the_broker_refuses_its_password(guild_env, tmp_path):
    from tests.services import RedisServer

    server = RedisServer(tmp_path / "pw-redis", password="right-password-123").start()
    try:
        env = {**guild_env, "REDIS_URL": server.url.replace("right-password-123", "wrong-password-456")}
        [done] = _refusals([([], env)])
    finally:
        server.stop()
    assert done.returncode == 1, done.stderr[-1000:]
    assert "error: Flower cannot use its broker: Redis refused the password in REDIS_URL" in done.stderr
    assert "wrong-password-456" not in done.stderr + done.stdout


def test_tasks_show_priority_campaign_and_dataset_a_waiting_job_its_wait_and_history_survives_a_restart(
        run_cli, start_worker, start_flower, store, cancel_at_end, guild_home, tmp_path):
    """Flower shows what an operator needs beside the job id (display only: the job id stays the task's one input),
    a parked job as WAITING with what it waits for (never a success), and its history after a restart
    (persistent mode, state under $GUILD_HOME/flower)."""
    standin = {"GUILD_ENGINE_FACTORY": "tests.standin_engines:steady"}
    for worker in [start_worker(name, wait_ready=False, env=standin) for name in ("gpu0@flowA", "gpu1@flowB")]:
        worker.wait_ready()
    flower = start_flower()
    paths = {}
    for name in ("ahead", "behind"):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text(json.dumps({"prompt": f"flower {name}", "response": "yes"}) + "\n")
    ahead = _enqueue(run_cli, paths["ahead"], "--priority", "high", "--campaign", "showc", "--set", "max_steps=600")
    cancel_at_end.append(ahead)
    wait_until(lambda: store.get(ahead).status.value == "processing", 60, what="the job ahead to start")
    behind = _enqueue(run_cli, paths["behind"], "--priority", "low", "--campaign", "showc", "--set", "max_steps=2")
    cancel_at_end.append(behind)

    info = wait_until(lambda: (i := flower.task_info(ahead)) and i.get("kwargs") and i, 30, interval_s=0.3,
                      what="Flower to show the task's kwargs")
    assert info["args"] == repr([ahead])
    assert info["kwargs"] == repr({"priority": "high", "campaign": "showc", "dataset": "ahead.jsonl",
                                   "hero": "tiny-qwen3"})
    waiting = wait_until(lambda: (i := flower.task_info(behind)) and i["state"] == "WAITING" and i, 30,
                         interval_s=0.3, what="Flower to show the parked job as WAITING")
    assert waiting["result"] == f"after job {ahead} of campaign showc"
    assert "'priority': 'low'" in waiting["kwargs"] and "'dataset': 'behind.jsonl'" in waiting["kwargs"]
    succeeded = _metric(flower.get("/metrics").body, "flower_events_total", task="guild.train", type="task-succeeded")
    assert not succeeded, "a waiting job was counted as a success"

    # ---- history across a restart --------------------------------------------------------------------------
    flower.stop()
    assert (guild_home / "flower").stat().st_mode & 0o777 == 0o700
    again = start_flower()
    kept = again.task_info(behind)
    assert kept is not None and kept["state"] == "WAITING" and kept["kwargs"] == waiting["kwargs"]
    assert again.task_info(ahead)["kwargs"] == info["kwargs"]
