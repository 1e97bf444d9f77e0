"""One writer per output: the lease object ``OUTPUT/_lease.json``.

A run that writes to an output first creates the lease atomically, renews it from a heartbeat thread and
deletes it when it stops (also on failure). Every change to the lease is a compare-and-swap, so two runs
can never both believe they hold it:

* ``s3://`` outputs: conditional requests. Create is ``PUT If-None-Match: *``; renewal, takeover and release
  are ``PUT``/``DELETE If-Match: <ETag of the version read>``. AWS S3 and SeaweedFS (4.48, measured: 16
  concurrent creators or takers of one key, 30 rounds, always exactly one winner) answer 412 to the loser.
* local paths: a complete file is published with ``link(2)``, which fails with EEXIST like ``O_EXCL``
  (``O_EXCL`` alone would let a reader see the file before its content), and every read-compare-write runs
  under ``flock(2)`` on the output directory, so renewal, takeover and release are atomic too.

A lease whose holder stopped heartbeating is taken over once it has expired. A holder on this machine (same
boot and pid namespace) whose process is gone is taken over at once, so rerunning after a crash or a kill
does not wait for the expiry. The expiry is compared with this machine's clock: hosts sharing an output need
clocks within a small fraction of the TTL (NTP gives milliseconds).

What a lease cannot do without fencing support in the store: a holder stalled past its expiry (a paused VM)
may still write after another run took over. The job narrows that window by confirming the lease before
every clear and every commit (``OutputLease.check``), renewing first when the last renewal is old.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from dcfm import storage
from dcfm.errors import ConfigError, SettingsConflict

LEASE_NAME = "_lease.json"
LEASE_FORMAT = "dcfm-segment-lease/1"


class OutputBusy(SettingsConflict):
    """Another live run holds the output's lease (exit 2: a usage error, not a failure of this run)."""


class LeaseLost(RuntimeError):
    """This run no longer holds the output's lease; it stops before writing more (exit 3, rerun to resume)."""


class _Changed(Exception):
    """A conditional write found another version than the one it was based on."""


def _process_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of ``pid``: with the pid it names one process, reuse or not;
    None when it is gone, a zombie, or this is not Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _machine() -> str:
    """Boot id and pid namespace: two processes with equal values see the same pids (containers that share a
    host name, e.g. with host networking, have different pid namespaces). Empty where /proc is missing."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@dataclass(frozen=True)
class LeaseRecord:
    """The content of ``_lease.json``: who writes to the output, and until when."""

    run_id: str
    token: str  # new for every acquisition: tells two invocations of one run id apart
    host: str
    pid: int
    process_start: str | None
    machine: str
    started: float  # Unix seconds (UTC)
    heartbeat: float
    expires: float
    format: str = LEASE_FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        return cls(**json.loads(data))

    def holder_is_gone(self) -> bool:
        """True only when the holder ran on this machine and its process no longer exists."""
        if not self.machine or self.machine != _machine():
            return False
        return _process_start(self.pid) != self.process_start

    def describe(self, now: float) -> str:
        """``run X (pid P on HOST, started ..., heartbeat Ns ago, expires at ... in Ns)``, for messages."""
        stamp = lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # noqa: E731
        return (f"run {self.run_id} (pid {self.pid} on {self.host}, started {stamp(self.started)}, last heartbeat "
                f"{now - self.heartbeat:.0f}s ago, expires {stamp(self.expires)}, in {self.expires - now:.0f}s)")


class _Store(Protocol):
    def read(self) -> tuple[bytes, object] | None: ...  # content and its version, or None when absent
    def create(self, data: bytes) -> object: ...  # FileExistsError when present
    def replace(self, data: bytes, version: object) -> object: ...  # _Changed when not at ``version``
    def delete(self, version: object) -> None: ...  # _Changed when not at ``version``


class _LocalStore:
    """A lease file; versions are its bytes, compared under ``flock`` on the output directory (no lock file
    to leave behind)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> tuple[bytes, object] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    def _publish(self, data: bytes, exclusive: bool) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            storage.set_usual_mode(tmp)
            if exclusive:
                os.link(tmp, self.path)  # EEXIST if present: never replaces a lease
            else:
                os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def create(self, data: bytes) -> object:
        with self._locked():
            self._publish(data, exclusive=True)
        return data

    def replace(self, data: bytes, version: object) -> object:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                raise _Changed
            self._publish(data, exclusive=False)
        return data

    def delete(self, version: object) -> None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                raise _Changed
            self.path.unlink()


class _S3Store:
    """A lease object; versions are ETags, every change a conditional request (boto3, standard AWS chain)."""

    def __init__(self, uri: str) -> None:
        import boto3

        _, path = storage.filesystem(uri)
        self.bucket, self.key = path.split("/", 1)
        self.client = boto3.client("s3")

    @staticmethod
    def _precondition(err: Exception) -> bool:
        response = getattr(err, "response", None) or {}
        code = response.get("Error", {}).get("Code")
        # 409 ConditionalRequestConflict: AWS's answer to conditional writes racing on one key.
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def read(self) -> tuple[bytes, object] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return response["Body"].read(), response["ETag"]

    def _put(self, data: bytes, **condition: str) -> object:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          ContentType="application/json", **condition)["ETag"]
        except ClientError as err:
            if self._precondition(err):
                raise _Changed from err
            raise

    def create(self, data: bytes) -> object:
        try:
            return self._put(data, IfNoneMatch="*")
        except _Changed:
            raise FileExistsError(errno.EEXIST, "lease exists", self.key) from None

    def replace(self, data: bytes, version: object) -> object:
        return self._put(data, IfMatch=str(version))

    def delete(self, version: object) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=str(version))
        except ClientError as err:
            if self._precondition(err) or getattr(err, "response", {}).get("Error", {}).get("Code") == "NoSuchKey":
                raise _Changed from err
            raise


def lease_uri(output: str) -> str:
    """Where the lease of ``output`` lives."""
    return storage.join(output, LEASE_NAME)


def _store_for(uri: str) -> _Store:
    fs, path = storage.filesystem(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols:
        return _S3Store(uri)
    if "file" in protocols:
        return _LocalStore(path)
    raise ValueError(f"{storage.redact(uri)}: outputs on {fs.protocol} have no atomic create; use a local path or s3://")


@dataclass(frozen=True)
class LeaseSettings:
    """How long a lease lasts without a heartbeat, and how long a run waits for a busy output."""

    ttl_s: float = 120.0
    wait_s: float | None = 0.0  # 0: refuse at once; None: wait as long as it takes

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ConfigError("lease.ttl_s", f"must be > 0 seconds, got {self.ttl_s}", option="--lease-ttl")
        if self.wait_s is not None and not self.wait_s >= 0:
            raise ConfigError("lease.wait_s", f"must be >= 0 seconds, got {self.wait_s}", option="--wait-for-lease")

    @property
    def heartbeat_s(self) -> float:
        """Renew six times per TTL: a store that stalls for most of a TTL does not cost the lease."""
        return self.ttl_s / 6


class OutputLease:
    """The lease on one output, held from ``acquire`` until ``release`` (a context manager does both and
    runs the heartbeat thread in between)."""

    def __init__(self, output: str, run_id: str, settings: LeaseSettings = LeaseSettings(),
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.time) -> None:
        self.uri = lease_uri(output)
        self.output, self.run_id, self.settings, self.log, self.clock = output, run_id, settings, log, clock
        self.store = _store_for(self.uri)
        self.record: LeaseRecord | None = None
        self.version: object = None
        self.lost: str | None = None  # why, once this run knows it no longer holds the lease
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquiring -----------------------------------------------------------------------------------------
    def _new_record(self, now: float) -> LeaseRecord:
        pid = os.getpid()
        return LeaseRecord(run_id=self.run_id, token=uuid.uuid4().hex, host=socket.gethostname(), pid=pid,
                           process_start=_process_start(pid), machine=_machine(), started=now, heartbeat=now,
                           expires=now + self.settings.ttl_s)

    def try_acquire(self) -> LeaseRecord | None:
        """Take the lease if it is free, expired or left by a dead process on this machine; else return the
        holder's record. Race-safe: of concurrent callers exactly one gets it."""
        while True:
            now = self.clock()
            mine = self._new_record(now)
            try:
                self.version = self.store.create(mine.to_bytes())
                self.record = mine
                return None
            except FileExistsError:
                pass
            current = self.store.read()
            if current is None:
                continue  # released between our create and read: try again
            data, version = current
            try:
                holder = LeaseRecord.from_bytes(data)
            except (ValueError, TypeError) as err:
                raise OutputBusy(f"{storage.redact(self.uri)} is not a lease this version can read ({err}); if no "
                                 "run is writing to this output, delete it and rerun") from None
            if holder.token == mine.token:  # our create went through and only its answer was lost (retried PUT)
                self.version, self.record = version, mine
                return None
            gone = holder.holder_is_gone()
            if holder.expires > now and not gone:
                return holder
            try:
                self.version = self.store.replace(mine.to_bytes(), version)
            except _Changed:
                continue  # another run renewed or took it first: look again
            self.record = mine
            why = "its process is gone" if gone else f"expired {now - holder.expires:.0f}s ago"
            self.log(f"[segment] took over the lease on {storage.redact(self.output)} from {holder.describe(now)}: {why}")
            return None

    def acquire(self) -> OutputLease:
        """Take the lease, waiting up to ``settings.wait_s`` for a holder to finish; ``OutputBusy`` otherwise."""
        deadline = self.clock() + (math.inf if self.settings.wait_s is None else self.settings.wait_s)
        told = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return self
            now = self.clock()
            if now >= deadline:
                waited = f" after waiting {self.settings.wait_s:.0f}s" if self.settings.wait_s else ""
                raise OutputBusy(
                    f"{storage.redact(self.output)} is being written by {holder.describe(now)}{waited}. One run writes "
                    f"to an output at a time: wait for it (--wait-for-lease), or use another --output. A run that "
                    f"was killed on another machine leaves its lease until it expires.")
            if not told:
                self.log(f"[segment] waiting for the lease on {storage.redact(self.output)}: held by {holder.describe(now)}")
                told = True
            time.sleep(max(0.05, min(self.settings.heartbeat_s, deadline - now, holder.expires - now + 0.05)))

    # --- holding -------------------------------------------------------------------------------------------
    def renew(self) -> None:
        """Push the expiry out; LeaseLost if another run changed the lease since our last write."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            assert self.record is not None, "renew() before acquire()"
            now = self.clock()
            record = LeaseRecord(**{**asdict(self.record), "heartbeat": now, "expires": now + self.settings.ttl_s})
            try:
                self.version = self.store.replace(record.to_bytes(), self.version)
            except _Changed:
                current = self.store.read()
                if current is not None and current[0] == record.to_bytes():  # a retried PUT that had gone through
                    self.version, self.record = current[1], record
                    return
                self.lost = (f"the lease on {storage.redact(self.output)} was taken by another run (this run's last "
                             f"heartbeat was {now - self.record.heartbeat:.0f}s ago); this run stops without "
                             "committing more. Rerun the same command to resume once the other run is done.")
                raise LeaseLost(self.lost) from None
            self.record = record

    def check(self) -> None:
        """Confirm the lease before a write that others must not race: renew first if the last renewal is
        more than one heartbeat old (the heartbeat thread may have been starved or the store unreachable)."""
        if self.lost:
            raise LeaseLost(self.lost)
        assert self.record is not None
        if self.clock() - self.record.heartbeat > self.settings.heartbeat_s:
            try:
                self.renew()
            except LeaseLost:
                raise
            except Exception as err:  # the store is unreachable: fine while the lease has not expired
                if self.clock() >= self.record.expires:
                    raise LeaseLost(f"the lease on {storage.redact(self.output)} expired and could not be renewed "
                                    f"({type(err).__name__}: {err}); rerun the same command to resume") from err

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as err:  # a store blip: the next heartbeat tries again, check() decides
                self.log(f"[segment] could not renew the lease on {storage.redact(self.output)} ({type(err).__name__}: "
                         f"{err}); retrying")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, unless another run holds it by now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.record is None or self.lost:
                return
            try:
                self.store.delete(self.version)
            except _Changed:
                pass  # someone took it over: theirs to keep
            self.record = None

    def __enter__(self) -> OutputLease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="dcfm-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
