"""Reliability 7: security. JSON-only messages, no pickle in the code, Flower's auth guard, Redis passwords, and
names that cannot escape ``$GUILD_HOME``."""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from jobs import keys
from jobs.queues import celery_key
from jobs.store import JobStore
from tests.reliability_helpers import (
    OwnRedis,
    enqueue_ids,
    no_traceback,
    queued_task_ids,
    record_figure,
    run_clis_at_once,
    wait_final,
    write_dataset,
)
from tests.services import REPO, free_port, stop_pid, wait_until

CODE_DIRS = ("engine", "tasks", "jobs", "heroes", "campaigns", "config")
CODE_FILES = ("enqueue.py", "doctor.py", "celeryconfig.py", "flowerconfig.py")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# Modules that may pickle, and why. engine/gang.py talks to the rank processes it starts itself over a socket pair
# that only they inherit (no network, no file, no other user): the worker's own trust domain, as Celery's prefork
# pool pickles between the worker and its pool processes. torch.load stays forbidden there too.
PICKLE_ALLOWED = {"engine/gang.py"}


class _CreatesFileWhenUnpickled:
    """A pickle payload: unpickling it calls ``open(path, "w")``, which creates the marker file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------- messages


JSON = "application/json"


def _envelope(body: bytes = b'[["no-such-job"], {}, {}]', *, tag: str = "", content_type: str | None = JSON,
              headers: object = None, raw_body: str | None = None, **header_changes) -> str:
    """A message as kombu's Redis transport stores it in a queue list (what anyone who can write to Redis sends)."""
    if headers is None:
        headers = {"lang": "py", "task": "guild.train", "id": f"poison-{tag}", "root_id": f"poison-{tag}",
                   "retries": 0, "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "", **header_changes}
    return json.dumps({
        "body": raw_body if raw_body is not None else base64.b64encode(body).decode(),
        "content-encoding": "utf-8" if content_type else None, "content-type": content_type, "headers": headers,
        "properties": {"correlation_id": tag, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "high"}, "delivery_tag": f"tag-{tag}"}})


# (what was sent, the envelope pushed onto the "high" list, what the dead letter's error says)
POISON = [
    ("body \"hello\"", _envelope(b'"hello"', tag="hello"), "the body is a string ('hello')"),
    ("body 5", _envelope(b"5", tag="five"), "the body is a number (5)"),
    ("body not JSON", _envelope(b"{not json", tag="notjson"), "cannot decode the body"),
    ("binary body, no content type", _envelope(bytes(range(256)), tag="binary", content_type=None),
     "a body without a content type"),
    ("time limit \"xx\"", _envelope(tag="tl", timelimit=["xx", None]), "header 'timelimit' is ['xx', None]"),
    ("time limit a string", _envelope(tag="tls", timelimit="xx"), "header 'timelimit' is 'xx'"),
    ("headers a string", _envelope(headers="x"), "not a kombu message envelope: AttributeError"),
    ("no task id", _envelope(headers={"task": "guild.train"}), "header 'id' is None"),
    ("unknown task", _envelope(tag="evil", task="evil.task"), "unknown task 'evil.task'"),
    ("Celery built-in task", _envelope(tag="chord", task="celery.chord_unlock"), "unknown task 'celery.chord_unlock'"),
    ("ETA not a date", _envelope(tag="eta", eta="garbage"), "invalid task message: invalid ETA value 'garbage'"),
    ("args not one job id", _envelope(b"[[], {}, {}]", tag="noargs"), "guild.train takes one job id"),
    ("envelope not JSON", "this is not json", "not a kombu message envelope: JSONDecodeError"),
    ("body not base64", _envelope(raw_body="!!!not base64!!!", tag="b64"), "not a kombu message envelope: Error"),
]


@pytest.mark.integration
@pytest.mark.slow
def test_poison_messages_are_dead_lettered_and_the_worker_goes_on(guild_env, start_worker, run_cli, store, tmp_path,
                                                                  redis_client):
    """Every message a worker cannot run is moved aside once, logged once and acked; the same worker process then
    trains a good job. Before tasks/poison.py each of these (but the pickle and the unknown task) killed the worker
    with "Unrecoverable error", and the restored message killed the next worker too."""
    from celery import Celery

    from celeryconfig import broker_transport_options

    marker = tmp_path / "pickle-was-executed"
    for _, envelope, _ in POISON:
        redis_client.lpush(celery_key("high"), envelope)
    attacker = Celery("attacker", broker=guild_env["REDIS_URL"], set_as_current=False)
    attacker.conf.broker_transport_options = broker_transport_options
    try:
        attacker.send_task("guild.train", args=[_CreatesFileWhenUnpickled(str(marker))], task_id="evil-pickle",
                           queue="high", routing_key="high", serializer="pickle")
        # What Flower's send-task API does with {"args": ["x"], "time_limit": "xx"}.
        attacker.send_task("guild.train", args=["x"], task_id="flower-xx", queue="high", routing_key="high",
                           time_limit="xx")
    finally:
        attacker.close()
    expected = [says for _, _, says in POISON] + ["refusing content type application/x-python-serialize (pickle)",
                                                  "header 'timelimit' is ['xx', None]"]
    worker = start_worker("gpu0@poison")
    pid = worker.proc.pid
    [job_id] = enqueue_ids(run_cli, str(write_dataset(tmp_path / "good.jsonl", "after-poison")), "--priority", "high",
                           "--set", "max_steps=2", "--set", "eval_fraction=0")
    [job] = wait_final(store, [job_id], timeout_s=120)

    assert job.status.value == "completed", (job.last_error, worker.log()[-3000:])
    assert worker.proc.poll() is None and worker.proc.pid == pid, worker.log()[-3000:]
    letters = store.dead_letters()[::-1]  # oldest first: the order the worker took them
    assert len(letters) == len(expected), [d.error for d in letters]
    assert all(says in d.error for says, d in zip(expected, letters)), [d.error for d in letters]
    assert letters[0].raw_body() == b'"hello"' and letters[0].queue == "high"
    assert letters[0].headers["id"] == "poison-hello" and letters[0].at
    log = worker.log()
    assert log.count("dead letter: ") == len(expected), log[-3000:]  # logged once each
    assert "Unrecoverable" not in log and "CRITICAL" not in log, log[-3000:]
    assert not marker.exists(), "the pickled payload was executed"
    assert queued_task_ids(redis_client) == []
    # The good job's message is acked once its task returns, just after the job's record says completed.
    wait_until(lambda: not redis_client.hlen(celery_key("unacked")), 30, what="every message acked")

    # ---- visible: `jobs dead-letters` lists them, doctor warns -----------------------------------------------------
    listed = run_cli("jobs", "dead-letters", "--limit", "3")
    assert listed.returncode == 0 and listed.stdout.startswith(f"{len(expected)} dead letter(s)"), listed.stderr
    assert "header 'timelimit' is ['xx', None]" in listed.stdout and "flower-xx" in listed.stdout
    doctor = run_cli("doctor", "--json")
    check = next(c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "dead-letters")
    assert check["warning"] and not check["ok"] and check["detail"].startswith(f"{len(expected)} message(s)")
    record_figure("security-poison-messages", runs=len(expected), passes=len(expected), lost=0,
                  worker_survived=True, dead_letters=len(expected), kinds=[what for what, _, _ in POISON]
                  + ["pickle", "time_limit xx via send_task"])


def _python_files() -> list[Path]:
    files = [REPO / name for name in CODE_FILES]
    for directory in CODE_DIRS:
        files += sorted((REPO / directory).rglob("*.py"))
    return files


def test_no_torch_load_and_no_pickle_in_the_code():
    """No module of Guild loads a pickle: not torch.load, not pickle (nor its cousins), not weights_only=False."""
    found = []
    for path in _python_files():
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO)
        may_pickle = where.as_posix() in PICKLE_ALLOWED
        for node in ast.walk(ast.parse(source, str(path))):
            if may_pickle and (isinstance(node, ast.Import) and all(a.name == "pickle" for a in node.names)):
                continue
            if isinstance(node, ast.Import):
                found += [f"{where}:{node.lineno}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")[0]
                if module in PICKLE_MODULES or (module == "torch" and any(a.name == "load" for a in node.names)):
                    found.append(f"{where}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                found.append(f"{where}:{node.lineno}: torch.load")
            elif isinstance(node, ast.keyword) and node.arg == "weights_only":
                found.append(f"{where}:{node.lineno}: weights_only=")
        # Strings and comments too: torch.load must not appear at all, pickle only in the sentences saying "never".
        found += [f"{where}:{n}: {line.strip()}" for n, line in enumerate(source.splitlines(), 1)
                  if "torch.load" in line or ("pickle" in line and "never" not in line and not may_pickle)]
    assert found == []
    from celeryconfig import accept_content, result_accept_content, result_serializer, task_serializer

    assert accept_content == result_accept_content == ["json"] and task_serializer == result_serializer == "json"
    record_figure("security-code-scan", runs=1, passes=1, lost=0, python_files=len(_python_files()), hits=0)


# ------------------------------------------------------------------------------------------------- flower


def _flower(env: dict, port: int, address: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--address={address}",
                                 f"--port={port}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _get_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.integration
def test_flower_refuses_to_start_unauthenticated_off_loopback(guild_env, tmp_path):
    env = {k: v for k, v in guild_env.items() if k != "FLOWER_BASIC_AUTH"}
    port, log_path = free_port(), tmp_path / "flower-open.log"
    started = time.monotonic()
    proc = _flower(env, port, "0.0.0.0", log_path)
    try:
        proc.wait(timeout=30)
    finally:
        stop_pid(proc)
    took_s = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    assert proc.returncode not in (0, None), log[-2000:]
    assert "refusing to start Flower on 0.0.0.0:" in log and "without authentication" in log
    assert "FLOWER_BASIC_AUTH" in log
    assert no_traceback(log)
    assert _get_status(f"http://127.0.0.1:{port}/") == 0  # nothing ever listened
    record_figure("security-flower-open", runs=1, passes=1, lost=0, exit_code=proc.returncode,
                  refused_in_s=round(took_s, 1))


@pytest.mark.integration
@pytest.mark.slow
def test_flower_with_auth_on_loopback_wants_credentials(guild_env, tmp_path):
    env = {**guild_env, "FLOWER_BASIC_AUTH": "admin:s3cret-flower"}
    port, log_path = free_port(), tmp_path / "flower-auth.log"
    proc = _flower(env, port, "127.0.0.1", log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.poll() is not None or _get_status(base + "/") != 0, 60, interval_s=0.2,
                   what="Flower to answer")
        assert proc.poll() is None, log_path.read_text(errors="replace")[-2000:]
        statuses = {path: (_get_status(base + path), _get_status(base + path, ("admin", "s3cret-flower")),
                           _get_status(base + path, ("admin", "wrong")))
                    for path in ("/", "/workers", "/api/workers")}
    finally:
        stop_pid(proc)
    assert all(s == (401, 200, 401) for s in statuses.values()), statuses
    record_figure("security-flower-auth", runs=1, passes=1, lost=0, statuses=statuses)


# -------------------------------------------------------------------------------------------------- redis


def _embedded(action: str, home: Path, port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update({"GUILD_HOME": str(home), "GUILD_REDIS_PORT": str(port)})
    return subprocess.run(["scripts/embedded_redis.sh", action], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.integration
def test_embedded_redis_refuses_a_taken_port_and_writes_no_url(tmp_path):
    """`make up` used to exit 0 and write the URL file when the port was taken (its Redis never started)."""
    home = tmp_path / "home"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _embedded("up", home, port)
    assert out.returncode != 0, (out.stdout, out.stderr)
    assert f"error: port {port} on 127.0.0.1 is taken" in out.stderr and "GUILD_REDIS_PORT=" in out.stderr
    assert not (home / "redis" / "url").exists() and not (home / "redis" / "redis.pid").exists()


@pytest.mark.integration
def test_embedded_redis_has_a_password_and_a_guild_user_that_cannot_write_files(tmp_path):
    """Before: no password, CONFIG allowed: any local user could CONFIG SET dir + SAVE an RDB file anywhere."""
    home, port = tmp_path / "home", free_port()
    redis_dir = home / "redis"
    try:
        out = _embedded("up", home, port)
        assert out.returncode == 0, (out.stdout, out.stderr)
        url = (redis_dir / "url").read_text().strip()
        guild_password = (redis_dir / "password").read_text().strip()
        admin_password = (redis_dir / "admin-password").read_text().strip()
        assert url == f"redis://guild:{guild_password}@127.0.0.1:{port}/0" and len(guild_password) >= 32
        assert oct(redis_dir.stat().st_mode & 0o777) == "0o700"
        for name in ("url", "password", "admin-password", "redis.conf"):
            assert oct((redis_dir / name).stat().st_mode & 0o777) == "0o600", name
        assert guild_password not in (redis_dir / "redis.conf").read_text()  # only its SHA-256
        pid = int((redis_dir / "redis.pid").read_text())
        assert guild_password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")

        guild = redis.Redis.from_url(url)
        assert guild.ping() and guild.set("guild:probe", "1")
        outside = tmp_path / "outside"
        outside.mkdir()
        refused = {}
        for command in (["CONFIG", "SET", "dir", str(outside)], ["CONFIG", "GET", "*"], ["SAVE"], ["BGSAVE"],
                        ["DEBUG", "SLEEP", "0"], ["MODULE", "LIST"], ["FLUSHALL"], ["KEYS", "*"], ["SHUTDOWN"],
                        ["ACL", "LIST"], ["REPLICAOF", "127.0.0.1", "1"], ["SET", "not-guilds", "1"]):
            try:
                guild.execute_command(*command)
                refused[command[0]] = False
            except redis.exceptions.NoPermissionError:
                refused[command[0]] = True
        assert all(refused.values()), refused
        assert list(outside.iterdir()) == []
        # What doctor reads instead of CONFIG GET:
        assert guild.info("persistence")["aof_enabled"] == 1 and guild.info("memory")["maxmemory_policy"] == \
            "noeviction"
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()  # no password: nothing
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url.replace(guild_password, "guessed-password")).ping()
        admin = redis.Redis(port=port, password=admin_password)  # the administrator is protected, not locked out
        assert admin.config_get("appendonly") == {"appendonly": "yes"}

        again = _embedded("up", home, port)  # idempotent: the same passwords, the same URL
        assert again.returncode == 0 and (redis_dir / "url").read_text().strip() == url
    finally:
        _embedded("down", home, port)
        pidfile = redis_dir / "redis.pid"
        if pidfile.exists():  # `down` failed: stop it by its pid
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
    record_figure("security-embedded-redis", runs=1, passes=1, lost=0, refused_for_guild_user=sorted(refused),
                  unauthenticated="refused", files_mode="0600")


# -------------------------------------------------------------------------------------------------- redis


@pytest.fixture
def password_redis(tmp_path):
    server = OwnRedis(tmp_path / "password-redis", password="s3cret-redis-pw")
    yield server.start()
    server.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_redis_password_is_honoured_by_every_component(password_redis, run_cli, start_worker, guild_home, tmp_path):
    right = {"REDIS_URL": password_redis.url}
    wrong = {"REDIS_URL": password_redis.url.replace("s3cret-redis-pw", "not-the-password")}
    none = {"REDIS_URL": f"redis://127.0.0.1:{password_redis.port}/0"}
    dataset = str(write_dataset(tmp_path / "pw.jsonl", "pw"))

    # ---- wrong or no password: each CLI fails in one line, without a traceback or the password ----------------------
    for bad in (wrong, none):
        outs = [run_cli("enqueue", dataset, extra_env=bad), run_cli("jobs", "list", extra_env=bad),
                run_cli("doctor", "--json", extra_env=bad)]
        for out in outs:
            assert out.returncode != 0, (out.args, out.stdout[-500:], out.stderr[-500:])
            assert no_traceback(out.stderr + out.stdout)
            assert "s3cret-redis-pw" not in out.stderr + out.stdout and "not-the-password" not in out.stderr
        assert "password" in outs[0].stderr.lower() or "auth" in outs[0].stderr.lower(), outs[0].stderr
        doctor = json.loads(outs[2].stdout)
        assert not doctor["healthy"] and not next(c for c in doctor["checks"] if c["name"] == "redis")["ok"]
    client = redis.Redis.from_url(password_redis.url)
    assert [k for k in client.scan_iter(match=keys.PREFIX + "*")] == []

    # ---- a worker with the wrong password does not start consuming, and says why -----------------------------------
    locked_out = start_worker("gpu1@wrong-password", wait_ready=False, env=wrong)
    wait_until(lambda: re.search(r"(?i)invalid username-password|WRONGPASS|authentication", locked_out.log()), 60,
               what="the wrong-password worker to say why it cannot connect")
    assert "ready." not in locked_out.log() and "not-the-password" not in locked_out.log()
    locked_out.stop()

    # ---- the right password: enqueue, worker, jobs list and doctor all work ------------------------------------------
    worker = start_worker("gpu0@password", env=right)
    [job_id] = enqueue_ids(run_cli, dataset, "--set", "max_steps=2", "--set", "eval_fraction=0", extra_env=right)
    [job] = wait_final(JobStore(client, guild_home), [job_id], timeout_s=90)
    assert job.status.value == "completed", (job.last_error, worker.log()[-2000:])
    listed = run_cli("jobs", "list", "--json", extra_env=right)
    assert listed.returncode == 0 and [j["id"] for j in json.loads(listed.stdout)] == [job_id]
    doctor = run_cli("doctor", "--json", extra_env=right)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["redis"]["ok"] and f"worker {worker.name}" in checks, checks
    assert "s3cret-redis-pw" not in doctor.stdout + worker.log()
    record_figure("security-redis-password", runs=1, passes=1, lost=0, components=["enqueue", "worker", "jobs list",
                  "doctor"], wrong_password_exit=outs[0].returncode, password_leaked=False)


@pytest.mark.integration
def test_wrong_redis_password_is_reported_as_such(password_redis, run_cli, guild_env, tmp_path):
    """redis.AuthenticationError subclasses ConnectionError: it used to read "cannot reach Redis ... start it with
    `make up`" (RELIABILITY.md, finding 5)."""
    wrong = {"REDIS_URL": password_redis.url.replace("s3cret-redis-pw", "not-the-password")}
    # A campaign with a job, so that `campaigns show --plot` reads the job records from Redis.
    enqueue_ids(run_cli, str(write_dataset(tmp_path / "pw.jsonl", "pw")), "--campaign", "pw-campaign",
                extra_env={"REDIS_URL": password_redis.url})
    # Before: `campaigns show --plot` printed a traceback; `jobs pause/resume` said "start Redis with `make up`".
    calls = [["jobs", "list"], ["jobs", "pause"], ["jobs", "resume"], ["campaigns", "show", "pw-campaign", "--plot"]]
    for out in run_clis_at_once({**guild_env, **wrong}, calls):
        assert out.returncode != 0 and no_traceback(out.stderr), (out.args, out.stderr[-1500:])
        assert "refused the password" in out.stderr and "make up" not in out.stderr, (out.args, out.stderr)
        assert "not-the-password" not in out.stderr + out.stdout
    doctor = json.loads(run_cli("doctor", "--json", extra_env=wrong).stdout)
    redis_check = next(c for c in doctor["checks"] if c["name"] == "redis")
    assert "refused the password" in redis_check["detail"] and "make up" not in redis_check["fix"], redis_check


def test_doctor_never_shows_any_part_of_a_password(tmp_path):
    """doctor used to split the URL at its first '@': a password holding one leaked its tail."""
    from config.settings import redact_url

    for url, shown in [("redis://:LeakTail99@LeakTail99@host:6379/0", "redis://:***@host:6379/0"),
                       ("redis://guild:p%40ss@127.0.0.1:6390/0", "redis://guild:***@127.0.0.1:6390/0"),
                       ("redis://:Leak/Tail99@host:6379/0", "redis://***"),
                       ("redis://:Leak?Tail99@host/0", "redis://***"),
                       ("redis://127.0.0.1:6390/0", "redis://127.0.0.1:6390/0")]:
        assert redact_url(url) == shown, url
    server = OwnRedis(tmp_path / "at-redis", password="LeakTail99@LeakTail99").start()
    try:
        env = {**os.environ, "REDIS_URL": server.url, "GUILD_HOME": str(tmp_path / "home")}
        out = subprocess.run([sys.executable, "-m", "doctor", "--json"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    finally:
        server.stop()
    detail = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "redis")["detail"]
    assert detail == f"reachable at redis://:***@127.0.0.1:{server.port}/0" and "Leak" not in out.stdout + out.stderr


# -------------------------------------------------------------------------------------------------- paths

_SAFE_JOB_ID = re.compile(r"^\d{8}T\d{6}_[^\W_][\w.-]*$")  # one path segment: letters of any script, digits, . - _


@pytest.mark.integration
def test_names_cannot_escape_guild_home(guild_env, guild_home, store, tmp_path):
    outside = tmp_path / "outside"
    (outside / "a" / "b").mkdir(parents=True)
    good = str(write_dataset(outside / "good.jsonl", "good"))
    evil = write_dataset(outside / "evil.jsonl", "evil")
    odd = write_dataset(outside / "..;$(touch pwned) `x` %2e%2e%2fx.jsonl", "odd")
    dotted = write_dataset(outside / "..evil.jsonl", "dotted")
    before = sorted(p for p in tmp_path.rglob("*") if guild_home not in p.parents and p != guild_home)

    refused_calls = {
        "campaign ../../x": ["enqueue", good, "--campaign", "../../x"],
        "campaign a/b": ["enqueue", good, "--campaign", "a/b"],
        "campaign ..": ["enqueue", good, "--campaign", ".."],
        "hero ../../etc/passwd": ["enqueue", good, "--hero", "../../etc/passwd"],
        "campaigns create --hero ../../etc/passwd": ["campaigns", "create", "c1", "--hero", "../../etc/passwd"],
        "campaigns show ../../x": ["campaigns", "show", "../../x"],
        "jobs show ../../x": ["jobs", "show", "../../x"],
        "jobs cancel a/b": ["jobs", "cancel", "a/b"],
        "jobs retry ../x": ["jobs", "retry", "../x"],
    }
    outs = dict(zip(refused_calls, run_clis_at_once(guild_env, list(refused_calls.values()))))
    for what, out in outs.items():
        assert out.returncode == 2, (what, out.stdout[-300:], out.stderr[-500:])
        assert no_traceback(out.stderr) and out.stderr.startswith("error: "), (what, out.stderr)

    # ---- datasets with hostile names: the copy lands in the content store, the job id is one safe path segment ------
    given = [str(outside / "a" / "b" / ".." / ".." / evil.name), str(odd), str(dotted)]
    out = subprocess.run([sys.executable, "-m", "enqueue", *given, "--json"], cwd=REPO, env=guild_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    jobs = json.loads(out.stdout)
    datasets = (guild_home / "datasets").resolve()
    for job in jobs:
        assert _SAFE_JOB_ID.match(job["id"]) and ".." not in job["id"].split("_", 1)[1].strip("."), job["id"]
        assert datasets in Path(job["dataset_path"]).resolve().parents, job["dataset_path"]
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()
    after = sorted(p for p in tmp_path.rglob("*") if guild_home not in p.parents and p != guild_home)
    assert after == before, "something was written outside $GUILD_HOME"
    assert not [p for p in tmp_path.rglob("*") if p.name in ("x", "passwd", "c1", "pwned")]
    assert sorted(p.name for p in (guild_home / "campaigns").glob("*/*")) == ["main-tiny-qwen3"]
    record_figure("security-paths", runs=len(refused_calls) + len(given), passes=len(refused_calls) + len(given),
                  lost=0, refused=list(refused_calls), hostile_dataset_names=len(given),
                  job_ids=[j["id"] for j in jobs])


def test_deploy_md_gives_the_acl_line_guild_runs_as():
    """DEPLOY.md asks a shared Redis for exactly the ACL user the tests (and the embedded Redis) run Guild as."""
    from config.redis_acl import guild_acl_rule

    line = "user " + guild_acl_rule(password_sha256="<sha256-of-the-password>")
    assert line in (REPO / "DEPLOY.md").read_text()
