"""Transient or permanent: what a failure says about the input, and what the job does about it.

A batch over an archive meets network blips, throttling, full disks and killed workers as well as bad files.
Only a bad file may become a ``failed`` row; everything else stops the job (exit 3) with nothing of the
video committed, so a plain rerun completes it. This module is the one place that tells them apart:

* ``Fault.INPUT``: the input itself cannot be opened, is not a video, or is corrupt. Its video is committed
  as failed, as before.
* ``Fault.TRANSIENT``: connection errors, timeouts, throttling (S3 ``SlowDown``, HTTP 429), server errors
  (5xx), and Ray losing a worker, actor or node. Retried with bounded exponential backoff, then the job stops.
* ``Fault.OUTPUT``: the output refuses a write or read (no space, quota, read-only, permission denied, no
  such bucket). Retried like a transient failure (space may be freed meanwhile), then the job stops; at
  start-up (``preflight``) it stops at once.

An error is classified by its whole chain (``__cause__``/``__context__``, and a Ray task error's ``cause``):
``VideoError`` wraps the storage error that made a video unreadable, and that decides.
"""

from __future__ import annotations

import errno
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from dcfm.errors import JobFailure
from dcfm.storage import redact

T = TypeVar("T")


class Fault(str, Enum):
    """What a failure is (a str enum, so it travels in JSON task summaries as its value)."""

    INPUT = "input"  # permanent: the input itself; a failed row
    TRANSIENT = "transient"  # storage, network or cluster unavailable for now: retry, then exit 3
    OUTPUT = "output"  # the output refuses writes (space, permission, read-only): retry, then exit 3

    @property
    def stops_job(self) -> bool:
        """True when the failure is not the input's: nothing of the video may be committed."""
        return self is not Fault.INPUT


class Side(Enum):
    """Which end of the job an operation touches: an input video, or the job's output."""

    INPUT = "input"
    OUTPUT = "output"


# Errnos of a network that is down or slow, wherever they come from (sockets, FUSE mounts, NFS).
_NETWORK_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EPIPE, errno.EAGAIN,
    errno.ESTALE,
})
# S3 (and S3-compatible) error codes that mean "not now" rather than "never".
_RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "RequestTimeout",
    "RequestTimeoutException", "ServiceUnavailable", "InternalError", "ExpiredToken", "RequestExpired",
    "ExpiredTokenException", "503", "500",
})


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors behind it, as a traceback would show them (bounded: chains can loop)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen and len(seen) < 32:
        seen.add(id(current))
        yield current
        cause = getattr(current, "cause", None)  # ray.exceptions.RayTaskError carries the worker's error here
        if isinstance(cause, BaseException) and id(cause) not in seen:
            yield from _chain(cause)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    status = getattr(err, "status", None)  # aiohttp ClientResponseError
    return status if isinstance(status, int) else None


def _error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _is_transient(err: BaseException) -> bool:
    """Network, timeout, throttling, server-side and cluster failures: worth waiting for."""
    if isinstance(err, TransientFailure):
        return err.fault is Fault.TRANSIENT
    if isinstance(err, (TimeoutError, ConnectionError)):  # includes asyncio's, PyAV's and socket timeouts
        return True
    if isinstance(err, OSError) and err.errno in _NETWORK_ERRNOS:
        return True
    status, code = _http_status(err), _error_code(err)
    if code in _RETRY_CODES or (status is not None and (status >= 500 or status == 429)):
        return True
    return _is_library_transient(err)


def _is_library_transient(err: BaseException) -> bool:
    """Transient error types of the libraries between the job and its storage and cluster. Each import is
    optional: the classification must not fail where a library is absent."""
    kinds: list[type] = []
    try:
        from botocore import exceptions as boto

        kinds += [boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError, boto.ResponseStreamingError]
    except ImportError:
        pass
    try:
        import aiohttp

        kinds += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        kinds.append(FSTimeoutError)
    except ImportError:
        pass
    try:
        import av.error

        kinds += [av.error.HTTPServerError, av.error.HTTPTooManyRequestsError]
    except ImportError:
        pass
    try:
        from ray import exceptions as rx

        # A killed actor or worker, a lost node or object, a full object store or disk: the cluster, not
        # the chunk. Ray retries these itself first (max_task_retries); what reaches the job is what is left.
        kinds += [rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError,
                  rx.ObjectLostError, rx.ObjectStoreFullError, rx.OutOfDiskError, rx.OutOfMemoryError,
                  rx.RaySystemError, rx.GetTimeoutError]
    except ImportError:
        pass
    return isinstance(err, tuple(kinds))


def classify(err: BaseException, side: Side = Side.INPUT) -> Fault:
    """What ``err``, raised while reading an input or writing the output (``side``), says about the job.

    Any transient error in the chain makes the whole failure transient. Otherwise a failure on the output
    side is the output's (full, read-only, denied, missing bucket: whatever it is, never the input's), and on
    the input side the input's.
    """
    chain = list(_chain(err))
    if any(_is_transient(e) for e in chain):
        return Fault.TRANSIENT
    for e in chain:
        if isinstance(e, TransientFailure):
            return e.fault
        if isinstance(e, OutputError):
            return Fault.OUTPUT
    return Fault.OUTPUT if side is Side.OUTPUT else Fault.INPUT


class OutputError(OSError):
    """An operation on the job's output failed; raised by ``on_output`` with the error as its cause."""


@contextmanager
def on_output(uri: str) -> Iterator[None]:
    """Mark failures inside the block as the output's (a staging write beside input decoding, say)."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        from dcfm.storage import redact

        raise OutputError(err.errno, f"{redact(uri)}: {type(err).__name__}: {err}") from err


_WHAT = {
    Fault.TRANSIENT: "storage, network or cluster unavailable",
    Fault.OUTPUT: "the output refused the operation (full, read-only or permission denied)",
}


class TransientFailure(JobFailure):
    """Retries of a transient (or output) failure ran out: the job stops with exit 3, nothing of the
    video it was working on is committed, and rerunning the same command resumes."""

    def __init__(self, what: str, fault: Fault, attempts: int, seconds: float, cause: str) -> None:
        fault = Fault(fault)
        super().__init__(what, fault.value, attempts, seconds, cause)  # all in args: it pickles across Ray
        self.what, self.fault, self.attempts, self.seconds, self.cause_text = what, fault, attempts, seconds, cause

    def __str__(self) -> str:
        tries = f" after {self.attempts} attempts over {self.seconds:.0f}s" if self.attempts > 1 else ""
        return (f"{self.what}: {_WHAT[self.fault]}{tries}: {self.cause_text}. Nothing of it was committed; "
                "fix the cause if it persists and rerun the same command to resume")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient failures. The defaults wait 2, 4, 8, 16 and 30 s between
    six attempts (about a minute besides the attempts themselves, which have their own timeouts), so an
    outage of under a minute is ridden out, and a longer one stops the job with exit 3."""

    attempts: int = 6
    first_delay_s: float = 2.0
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError(f"retry delays need 0 <= first_delay_s <= max_delay_s, got "
                             f"{self.first_delay_s}, {self.max_delay_s}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), with up to 25 % jitter so the actors one
        outage hit do not all come back at the same instant."""
        base = min(self.max_delay_s, self.first_delay_s * 2 ** (retry - 1))
        return base * (1 - 0.25 * random.random())

    def call(self, fn: Callable[[], T], side: Side, what: str,
             retry_on: frozenset[Fault] = frozenset({Fault.TRANSIENT, Fault.OUTPUT}),
             log: Callable[[str], None] | None = None) -> T:
        """``fn()``, retried while it fails with a fault in ``retry_on``. An input fault is re-raised as it is;
        a fault that stops the job raises ``TransientFailure`` (naming ``what``) when retries run out."""
        start = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientFailure:
                raise  # already retried below us
            except Exception as err:
                fault = classify(err, side)
                if not fault.stops_job:
                    raise
                if fault not in retry_on or attempt == self.attempts:
                    raise TransientFailure(what, fault, attempt, time.monotonic() - start,
                                           f"{type(err).__name__}: {err}") from err
                wait = self.delay(attempt)
                if log is not None:
                    # Actors log with print, not through the job's redacting log: a URL in the error goes here.
                    log(redact(f"[retry] {what}: {fault.value} failure ({type(err).__name__}: {err}); attempt "
                               f"{attempt + 1}/{self.attempts} in {wait:.1f}s"))
                time.sleep(wait)
        raise AssertionError("unreachable")


def preflight(output: str, checkpoint: str, policy: RetryPolicy, log: Callable[[str], None] | None = None) -> None:
    """Before any model work: the output takes a write and a delete, and the checkpoint's files can be read.

    Permission, read-only and missing-bucket errors stop the job at once (exit 3, nothing written); network
    failures are retried first.
    """
    from dcfm import storage
    from dcfm.checkpoint import CARD_FILE, WEIGHTS_FILE

    probe = storage.join(output, f"_write_probe-{secrets.token_hex(6)}")

    def write_and_delete() -> None:
        with on_output(output):
            storage.write_bytes_atomic(probe, b"dcfm write probe; safe to delete\n")
            fs, path = storage.filesystem(probe)
            fs.rm(path)

    try:
        policy.call(write_and_delete, Side.OUTPUT, f"output {storage.redact(output)}",
                    retry_on=frozenset({Fault.TRANSIENT}), log=log)
    except TransientFailure as err:
        hint = ("check that the path exists or can be created, is writable by this user and its disk has "
                "space" if "://" not in output else
                "check the bucket exists and the credentials allow s3:PutObject, s3:GetObject, s3:ListBucket "
                "and s3:DeleteObject under the prefix")
        raise JobFailure(f"the output {storage.redact(output)} is not writable ({err.cause_text}); {hint}. "
                         "Nothing was written.") from err

    def read_checkpoint() -> None:
        for name in (CARD_FILE, WEIGHTS_FILE):
            fs, path = storage.filesystem(storage.join(checkpoint, name))
            with fs.open(path, "rb") as handle:
                handle.read(16)

    try:
        policy.call(read_checkpoint, Side.OUTPUT, f"checkpoint {storage.redact(checkpoint)}",
                    retry_on=frozenset({Fault.TRANSIENT}), log=log)
    except TransientFailure as err:
        raise JobFailure(f"the checkpoint {storage.redact(checkpoint)} is not readable ({err.cause_text}); "
                         "check the path and that the credentials allow reading it. Nothing was written.") from err
