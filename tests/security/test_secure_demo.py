"""``kv-demo --secure`` end to end, shortened: certificates, ZooKeeper on a TLS port only with
credentials and a secured parent, TLS nodes, a load with the client certificate, kill -9 of the
primary, the verdict."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

DEMO_TIMEOUT_S = 300


def test_secure_demo_runs_end_to_end(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kvstore", "demo", "--secure", "--seconds", "6"]
    command += ["--threads", "2", "--keyspace", "100", "--workdir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = done.stdout.splitlines()
    assert any(line.startswith("OK (") and "operations" in line for line in lines), output
    assert any(line.startswith("== killed primary") for line in lines), output
    assert "created (secure ACL)" in done.stdout
    assert "(TLS only, client certificates required)" in done.stdout
    (root,) = tmp_path.iterdir()
    credentials = (root / "zk-auth").read_text().strip()
    assert stat.S_IMODE(os.stat(root / "zk-auth").st_mode) == 0o600
    assert credentials.split(":", 1)[1] not in output
    node_logs = [path.read_text() for path in (root / "nodes").glob("node-*.log")]
    assert len(node_logs) == 2
    for log in node_logs:
        assert "--tls-cert" in log and "--zk-tls-cert" in log and "--zk-auth-file" in log
        assert "no ZooKeeper credentials" not in log and "Traceback" not in log
