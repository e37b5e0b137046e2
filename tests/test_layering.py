"""The shape of the code, read statically from the source (ast): one owner of the Redis layout, no package cycle.

ARCHITECTURE.md, "Layers", explains both rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.services import REPO

# Bottom to top. A package may import packages of a lower rank only (same rank: neither imports the other).
RANKS = {"config": 0, "engine": 1, "heroes": 2, "campaigns": 3, "jobs": 4, "tasks": 5, "celeryconfig": 6,
         "flowerconfig": 6}
PACKAGES = ("config", "heroes", "engine", "campaigns", "jobs", "tasks")
TOP_LEVEL = ("celeryconfig.py", "flowerconfig.py")
CLIS = ("enqueue.py", "doctor.py")  # like every */__main__.py: on top of everything, may import any package
STORE = (REPO / "jobs" / "store.py", REPO / "jobs" / "keys.py")  # the store and its private layout
# The embedded Redis' own set-up, not the job store's layout: its ACL (which names the key patterns Guild's user may
# touch) and the first ping that waits for the server to come up, before any store exists.
SERVER_SETUP = (REPO / "config" / "redis_acl.py", REPO / "config" / "embedded_redis_cli.py")

# Redis client methods no other Python object in this code base has. Ambiguous names (get, set, delete, exists,
# type, info, ping) are caught by the rules on clients and on ``.redis`` instead.
REDIS_METHODS = {
    "hget", "hset", "hgetall", "hmget", "hmset", "hdel", "hkeys", "hvals", "hlen", "hincrby", "hscan", "hsetnx",
    "zadd", "zrem", "zrange", "zrangebyscore", "zrevrange", "zrevrangebyscore", "zcard", "zscore", "zmscore",
    "zincrby", "zscan", "sadd", "srem", "smembers", "sismember", "scard", "sscan", "lpush", "rpush", "lpop", "rpop",
    "lrange", "llen", "lrem", "ltrim", "lindex", "brpop", "blpop", "evalsha", "script_load", "scan_iter", "incr",
    "incrby", "expire", "pexpire", "setex", "psetex", "setnx", "mget", "mset", "getset", "flushall",
    "flushdb", "config_get", "config_set", "execute_command", "watch", "multi", "publish", "xadd",
}
CLIENT_CONSTRUCTORS = {"Redis", "StrictRedis", "from_url", "ConnectionPool"}


def _product_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    return files + [REPO / name for name in TOP_LEVEL + CLIS if (REPO / name).exists()]


def _is_cli(path: Path) -> bool:
    return path.name == "__main__.py" or path.name in CLIS


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def _redis_access(path: Path, tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name in REDIS_METHODS or (name == "eval" and node.args):  # model.eval() takes no argument
                found.append(f"{_where(path, node)}: calls .{name}()")
            if name in CLIENT_CONSTRUCTORS and "redis" in ast.unparse(node.func).lower():
                found.append(f"{_where(path, node)}: makes a Redis client ({ast.unparse(node.func)})")
        elif isinstance(node, ast.Attribute) and node.attr in ("redis", "_redis") and not (
                isinstance(node.value, ast.Name) and node.value.id == "redis"):
            found.append(f"{_where(path, node)}: reaches into a store's client (.{node.attr})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("guild:"):
            found.append(f"{_where(path, node)}: writes a Guild key {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and (node.module == "jobs.keys" or (
                node.module == "jobs" and any(a.name == "keys" for a in node.names))):
            found.append(f"{_where(path, node)}: imports the key layout (jobs.keys)")
        elif isinstance(node, ast.Import) and any(a.name == "jobs.keys" for a in node.names):
            found.append(f"{_where(path, node)}: imports the key layout (jobs.keys)")
    return found


def test_only_the_job_store_touches_redis():
    """Every Redis command and every ``guild:`` key lives in jobs/store.py (issue 12): a second owner drifts."""
    found = []
    for path in _product_files():
        if path in STORE or path in SERVER_SETUP:
            continue
        found += _redis_access(path, ast.parse(path.read_text(encoding="utf-8")))
    assert found == [], "Redis reached outside jobs/store.py; give the store a method:\n" + "\n".join(found)


def test_the_scan_catches_raw_access():
    """The rule above would see what it is meant to see."""
    code = ("import redis\nfrom jobs import keys\nc = redis.Redis.from_url(u)\nstore.redis.hget(k, 'f')\n"
            "client.eval(SCRIPT, 1, 'high')\nmodel.eval()\nx = 'guild:jobs:queued'\n")
    found = _redis_access(REPO / "jobs" / "x.py", ast.parse(code))
    assert len(found) == 6, found  # model.eval() is not Redis


def _imported_packages(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(RANKS)


def _package_graph() -> dict[str, dict[str, str]]:
    """package → {imported package: the first file:line that imports it}."""
    graph: dict[str, dict[str, str]] = {name: {} for name in RANKS}
    for path in _product_files():
        if _is_cli(path):
            continue
        owner = path.relative_to(REPO).parts[0].removesuffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for imported in _imported_packages(tree) - {owner}:
            graph[owner].setdefault(imported, str(path.relative_to(REPO)))
    return graph


def _find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in graph:
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_packages():
    graph = _package_graph()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle) + "; " + "; ".join(
        f"{a} imports {b} in {graph[a][b]}" for a, b in zip(cycle, cycle[1:]))


def test_packages_import_only_lower_layers():
    graph = _package_graph()
    upward = [f"{a} (layer {RANKS[a]}) imports {b} (layer {RANKS[b]}) in {where}"
              for a, deps in graph.items() for b, where in deps.items() if RANKS[b] >= RANKS[a]]
    assert upward == [], "\n".join(upward)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": ""}, "b": {}, "c": {"a": ""}}) is None
