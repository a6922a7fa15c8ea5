"""A real Flower deployment on this machine: ``flwr run`` against a SuperLink and SuperNodes.

Each test starts its own SuperLink and two SuperNodes on free localhost ports (insecure
mode), each SuperNode holding one partition, and runs fedtune's app folder ``flower/``
with ``flwr run``. The SuperNodes beat at Flower's shortest heartbeat (10 s, see
``supernode_quick_heartbeat.py``), so a killed one is declared lost in about 20 s instead of
a minute. Waits are on events (a line in a log, a process ending); the bounds
are hang guards only.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower engine needs the extra: pip install -e '.[flower]'")

from fedtune_core.config import RunConfig  # noqa: E402
from fedtune_core.fl import builtin

ROOT = Path(__file__).resolve().parents[1]
QUICK_HEARTBEAT = Path(__file__).with_name("supernode_quick_heartbeat.py")  # lost in ~20 s
GUARD = 900  # seconds: only so that a broken federation fails instead of hanging CI
CLIENTS = 2
pytestmark = pytest.mark.slow  # a SuperLink, two SuperNodes, a process per message


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_line(log: Path, text: str, after: int = 0, proc=None) -> None:
    """Return once ``log`` holds more than ``after`` lines containing ``text``."""
    deadline = time.monotonic() + GUARD
    while _count(log, text) <= after:
        assert proc is None or proc.poll() is None, f"{log.name}: the process ended early"
        assert time.monotonic() < deadline, f"hang guard: no {text!r} in {log}"
        time.sleep(0.2)


def _count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text) if log.exists() else 0


class Federation:
    """A SuperLink and one SuperNode per partition, each in its own process group."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.logs = tmp, {}, {}
        link, *nodes = _free_ports(1 + CLIENTS)
        home = tmp / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{link}"\ninsecure = true\n')
        bin_dir = str(Path(sys.executable).parent)
        self.env = os.environ | {"FLWR_HOME": str(home), "PYTHONPATH": str(ROOT),
                                 "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
        self._start("link", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                    str(link), "--database", str(tmp / "link.db"),
                    "--disable-runtime-dependency-installation")
        _wait_for_line(self.logs["link"], "Uvicorn running on", proc=self.procs["link"])
        for i, port in enumerate(nodes):
            self._start(f"node{i}", sys.executable, str(QUICK_HEARTBEAT), "--insecure",
                        "--superlink", f"127.0.0.1:{link}", "--port", str(port), "--node-config",
                        f"partition-id={i} num-partitions={CLIENTS}")

    def _start(self, name: str, *argv: str) -> None:
        self.logs[name] = self.tmp / f"{name}.log"
        with open(self.logs[name], "w") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env, cwd=self.tmp,
                                                start_new_session=True)

    def kill(self, name: str) -> None:
        """SIGKILL a process and its whole group (a SuperNode's ClientApp processes too)."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def run(self, cfg: RunConfig, results: Path) -> subprocess.Popen:
        """Start ``flwr run flower/`` for ``cfg`` (its record goes to ``results``)."""
        overrides = self.tmp / "run.toml"
        overrides.write_text(f"fedtune-config = '{json.dumps(cfg.to_dict())}'\n"
                             f"results = '{results}'\nreply-timeout = {float(GUARD)}\n")
        return subprocess.Popen(["flwr", "run", str(ROOT / "flower"), "local", "--run-config",
                                 str(overrides), "--stream"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    yield fed
    fed.close()


@pytest.fixture
def deploy_config(tiny_config):
    return tiny_config(clients=CLIENTS, sample=CLIENTS, rounds=2).replace(engine="flower")


def _record(results: Path) -> dict:
    files = sorted((results / "runs").iterdir())
    assert [f.suffix for f in files] == [".json"], f"expected one record, found {files}"
    return json.loads(files[0].read_text())


def test_flwr_run_writes_the_builtin_loops_numbers(federation, deploy_config, tmp_path):
    results = tmp_path / "results"
    run = federation.run(deploy_config, results)
    out, _ = run.communicate(timeout=GUARD)
    assert run.returncode == 0, out
    record = _record(results)
    assert record["status"] == "ok", record.get("error")
    assert record["engine"] == "flower" and record["hash"] == deploy_config.hash
    built_in = builtin.execute(deploy_config.replace(engine="builtin"))
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]
    for got, want in zip(record["rounds"], built_in.rows, strict=True):
        assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1e-6)
        assert (got["bytes_up"], got["bytes_down"]) == (want["bytes_up"], want["bytes_down"])
    assert record["final"]["samples_per_client"] == built_in.final["samples_per_client"]


def test_a_supernode_killed_mid_round_fails_the_run_naming_it(federation, deploy_config,
                                                              tmp_path):
    results = tmp_path / "results"
    log = federation.logs["node1"]
    before = _count(log, "Receiving: train message")
    run = federation.run(deploy_config, results)
    _wait_for_line(log, "Receiving: train message", after=before, proc=run)
    federation.kill("node1")  # it holds round 1's train message and has not replied
    out, _ = run.communicate(timeout=GUARD)  # ends: the server does not wait for ever
    record = _record(results)  # one complete record, no temporary file beside it
    assert record["status"] == "failed"
    assert "partition 1" in record["error"] and "round 1" in record["error"], record["error"]
    assert "was lost" in record["error"]
