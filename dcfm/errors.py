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
