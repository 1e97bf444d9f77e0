"""The output lease (dcfm.segment.lease) on local disk and on a real S3 server (SeaweedFS): create, refuse,
wait, heartbeat, takeover after expiry or of a dead process, and races between takers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from dcfm import storage
from dcfm.errors import ConfigError
from dcfm.segment.lease import LeaseLost, LeaseRecord, LeaseSettings, OutputBusy, OutputLease, lease_uri


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_env") + "/out"


def lease_record(output: str) -> LeaseRecord | None:
    uri = lease_uri(output)
    return LeaseRecord.from_bytes(storage.read_bytes(uri)) if storage.exists(uri) else None


def quiet(_: str) -> None:
    pass


def test_create_refuse_release(output: str) -> None:
    first = OutputLease(output, "run-a", LeaseSettings(ttl_s=30), log=quiet).acquire()
    record = lease_record(output)
    assert record is not None and record.run_id == "run-a" and record.token == first.record.token
    assert record.expires - record.heartbeat == pytest.approx(30) and record.pid > 0 and record.host
    with pytest.raises(OutputBusy) as refused:
        OutputLease(output, "run-b", LeaseSettings(ttl_s=30), log=quiet).acquire()
    message = str(refused.value)
    # The loser is told who holds the output and until when.
    assert "run run-a" in message and f"pid {record.pid}" in message and "expires" in message
    assert "--wait-for-lease" in message
    first.release()
    assert lease_record(output) is None
    OutputLease(output, "run-b", LeaseSettings(ttl_s=30), log=quiet).acquire().release()


def test_expired_lease_is_taken_over_and_the_old_holder_knows(output: str) -> None:
    old = OutputLease(output, "run-a", LeaseSettings(ttl_s=5), log=quiet).acquire()
    later = lambda: time.time() + 6  # noqa: E731  (past the old holder's expiry)
    said: list[str] = []
    new = OutputLease(output, "run-b", LeaseSettings(ttl_s=5), log=said.append, clock=later).acquire()
    assert lease_record(output).token == new.record.token
    assert "took over" in said[0] and "run run-a" in said[0] and "expired" in said[0]
    # The old holder finds out at its next renewal or check, and its release leaves the new lease alone.
    with pytest.raises(LeaseLost, match="taken by another run"):
        old.renew()
    with pytest.raises(LeaseLost):
        old.check()
    old.release()
    assert lease_record(output).token == new.record.token
    new.release()
    assert lease_record(output) is None


def test_heartbeat_keeps_the_lease_past_its_ttl(output: str) -> None:
    settings = LeaseSettings(ttl_s=1.2)  # renewed every 0.2 s
    with OutputLease(output, "run-a", settings, log=quiet) as held:
        first = lease_record(output)
        time.sleep(2.0)  # longer than the TTL
        now = time.time()
        current = lease_record(output)
        assert current.token == first.token and current.heartbeat > first.heartbeat
        assert current.expires > now
        with pytest.raises(OutputBusy):
            OutputLease(output, "run-b", settings, log=quiet).acquire()
        held.check()
    assert lease_record(output) is None  # released on exit


def test_released_on_failure(output: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with OutputLease(output, "run-a", LeaseSettings(ttl_s=30), log=quiet):
            raise RuntimeError("boom")
    assert lease_record(output) is None


def test_waiting_for_a_busy_output(output: str) -> None:
    holder = OutputLease(output, "run-a", LeaseSettings(ttl_s=30), log=quiet).acquire()
    with pytest.raises(OutputBusy, match="after waiting"):
        OutputLease(output, "run-b", LeaseSettings(ttl_s=30, wait_s=0.3), log=quiet).acquire()
    timer = threading.Timer(0.5, holder.release)
    timer.start()
    said: list[str] = []
    started = time.monotonic()
    waiter = OutputLease(output, "run-b", LeaseSettings(ttl_s=3, wait_s=None), log=said.append).acquire()
    timer.join()
    assert time.monotonic() - started >= 0.4 and lease_record(output).run_id == "run-b"
    assert "waiting for the lease" in said[0] and "run run-a" in said[0]
    waiter.release()


def test_lease_of_a_killed_process_on_this_machine_is_taken_at_once(output: str) -> None:
    # A process that takes the lease and is SIGKILLed before it can release it.
    code = ("import os, signal; from dcfm.segment.lease import OutputLease, LeaseSettings; "
            f"OutputLease({output!r}, 'run-a', LeaseSettings(ttl_s=600)).acquire(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code], check=False)
    stale = lease_record(output)
    assert stale is not None and stale.expires > time.time() + 500  # far from expired
    said: list[str] = []
    taken = OutputLease(output, "run-b", LeaseSettings(ttl_s=30), log=said.append).acquire()
    assert "its process is gone" in said[0] and f"pid {stale.pid}" in said[0]
    taken.release()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "expired"])
def test_concurrent_takers_get_one_lease(output: str, stale: bool) -> None:
    if stale:  # a lease nobody renews, expired for everyone below
        OutputLease(output, "run-old", LeaseSettings(ttl_s=1), log=quiet, clock=lambda: time.time() - 60).acquire()
    takers = [OutputLease(output, f"run-{i}", LeaseSettings(ttl_s=30), log=quiet) for i in range(8)]
    barrier = threading.Barrier(len(takers))

    def take(lease: OutputLease) -> bool:
        barrier.wait()
        return lease.try_acquire() is None

    results: list[bool] = [False] * len(takers)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, take(takers[i]))) for i in range(len(takers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 1
    winner = takers[results.index(True)]
    assert lease_record(output).token == winner.record.token
    winner.release()


def test_lease_is_one_json_object(tmp_path) -> None:
    lease = OutputLease(str(tmp_path), "run-a", LeaseSettings(ttl_s=30), log=quiet).acquire()
    data = json.loads((tmp_path / "_lease.json").read_text())
    assert {"run_id", "host", "pid", "started", "heartbeat", "expires", "token"} <= data.keys()
    assert data["format"] == "dcfm-segment-lease/1"
    lease.release()


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="must be > 0 seconds") as bad_ttl:
        LeaseSettings(ttl_s=0)
    assert bad_ttl.value.for_command_line() == "--lease-ttl must be > 0 seconds, got 0"
    with pytest.raises(ConfigError, match="must be >= 0 seconds") as bad_wait:
        LeaseSettings(wait_s=-1)
    assert bad_wait.value.for_command_line().startswith("--wait-for-lease ")
