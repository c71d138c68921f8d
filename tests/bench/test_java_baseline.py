"""kv-bench --java-baseline: the seed's Java original and our nodes in one invocation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "shared" / "baseline" / "compare"


def bench(workdir: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", "bench", "--no-matrix", "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_a_missing_script_is_one_error_line(tmp_path: Path) -> None:
    done = bench(tmp_path, "--java-baseline", str(tmp_path / "nowhere"), timeout_s=120)
    assert done.returncode == 1
    assert "no script at" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not SCRIPT.is_file(), reason=f"the seed's Java baseline is not at {SCRIPT}")
def test_kv_bench_prints_the_same_run_ratio(tmp_path: Path) -> None:
    args = ("--java-baseline", str(SCRIPT), "--java-rounds", "1", "--seconds", "4")
    done = bench(tmp_path, *args, timeout_s=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ratio_line = [line for line in done.stdout.splitlines() if "ours/Java" in line][-1]
    assert float(ratio_line.rsplit(" ", 1)[1]) > 0
    logs = list(tmp_path.glob("*/java-baseline.txt"))
    assert logs and "median ours:" in logs[0].read_text()


def test_sigterm_stops_the_compare_script_too(tmp_path: Path) -> None:
    """The script runs nodes, a client and ZooKeeper for minutes: kv-bench stopped by SIGTERM
    must not leave it running (nor wait for it)."""
    script = tmp_path / "compare"
    ran = tmp_path / "ran"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"trap 'echo cleaned >> {ran}' EXIT\n"
        f"echo $$ > {ran}\n"
        "echo 'round 1: started'\n"
        "sleep 120\n"
    )
    script.chmod(0o755)
    command = [sys.executable, "-m", "kvstore", "bench", "--no-matrix"]
    command += ["--workdir", str(tmp_path / "work"), "--java-baseline", str(script)]
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert bench.stdout is not None
        for line in bench.stdout:  # (ends at EOF: the test's timeout bounds it)
            if "round 1: started" in line:
                break
        bench.terminate()
        _, stderr = bench.communicate(timeout=30)
    finally:
        bench.kill()
        bench.wait()
    assert bench.returncode == 143, stderr
    assert "Traceback" not in stderr
    pid, cleaned = ran.read_text().split()
    assert cleaned == "cleaned"
    assert not Path(f"/proc/{pid}").exists()
