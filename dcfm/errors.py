"""What every job reports when it stops: its exit codes, and the error for settings that contradict a run's
recorded ones. Core code raises these; the command lines (dcfm.jobcli) turn them into exit statuses."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit status of every job; documented in each job's --help."""

    OK = 0  # finished; for segment, every input committed with status ok or empty
    INPUTS_FAILED = 1  # segment only: the job finished, but some inputs failed (see errors/)
    USAGE = 2  # bad command line, or settings that contradict what --output already holds
    JOB_FAILED = 3  # the job itself failed (cluster, checkpoint, data, storage); rerunning resumes


class SettingsConflict(ValueError):
    """The command contradicts the run already recorded in its output; the fix is a new --output."""


class InputError(ValueError):
    """An input the job refuses before doing any work (a protocol not allowed, a folder without videos, a bad
    manifest); the message names the input and the fix. A usage error: nothing was read or written."""


class ConfigError(ValueError):
    """A setting a job's config refuses. The message names the config field, as Python callers set it; the
    command lines (``dcfm.jobcli.run_job``) show the option that sets it instead."""

    def __init__(self, field: str, problem: str, option: str | None = None) -> None:
        self.field, self.problem = field, problem
        self.option = option or "--" + field.replace("_", "-")
        super().__init__(f"{field} {problem}")

    def for_command_line(self) -> str:
        return f"{self.option} {self.problem}"


class JobFailure(RuntimeError):
    """The job stopped for a reason outside its inputs (storage or network unavailable, the output not
    writable, the cluster losing workers); exit 3, one line, and rerunning the same command resumes."""
