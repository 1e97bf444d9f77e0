"""The exit codes and error reporting every job shares (`dcfm segment`, `dcfm train`, `dcfm evaluate`)."""

from __future__ import annotations

import argparse

import pytest

from dcfm.checkpoint import CheckpointError
from dcfm.errors import ConfigError, ExitCode, JobFailure, SettingsConflict
from dcfm.faults import Fault, TransientFailure
from dcfm.jobcli import non_negative_int, parse_size, positive_int, run_job
from dcfm.train.config import RunMismatchError

ARGS = argparse.Namespace(value=1)


def fails_with(err: BaseException):
    def run(config) -> int:
        raise err
    return run


def test_a_finished_job_returns_its_summarys_exit_code() -> None:
    summary = argparse.Namespace(exit_code=ExitCode.INPUTS_FAILED)
    assert run_job("segment", ARGS, lambda a: a.value, lambda config: summary) == 1
    assert run_job("train", ARGS, lambda a: a.value, lambda config: object()) == 0


def test_settings_the_config_rejects_are_usage_errors(capsys) -> None:
    def build(args):
        raise ValueError("--max-interval 2 is below --min-interval 3")
    assert run_job("segment", ARGS, build, lambda c: 0) == ExitCode.USAGE
    assert "dcfm segment: error: --max-interval 2 is below --min-interval 3" in capsys.readouterr().err


def test_config_errors_name_the_field_in_python_and_the_option_on_the_command_line(capsys) -> None:
    """A config built in Python says which field is wrong; the same config built by a command line names the
    option the user typed."""
    from dcfm.segment.config import SegmentJobConfig
    from dcfm.train.config import TrainJobConfig

    with pytest.raises(ConfigError, match=r"^chunk_frames must be >= 1, got 0$"):
        SegmentJobConfig(inputs=["v.mp4"], output="out", checkpoint="ckpt", chunk_frames=0)
    with pytest.raises(ConfigError, match=r"^min_actors needs"):
        SegmentJobConfig(inputs=["v.mp4"], output="out", checkpoint="ckpt", min_actors=3, max_actors=2)

    def build(args):
        return SegmentJobConfig(inputs=["v.mp4"], output="out", checkpoint="ckpt", min_actors=3, max_actors=2)
    assert run_job("segment", ARGS, build, lambda c: 0) == ExitCode.USAGE
    assert "dcfm segment: error: --actors needs 1 <= min_actors <= max_actors, got 3,2" in capsys.readouterr().err

    def build_train(args):
        return TrainJobConfig(data="data", output="runs/r1", steps=0)
    assert run_job("train", ARGS, build_train, lambda c: 0) == ExitCode.USAGE
    assert "dcfm train: error: --steps must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("err", [SettingsConflict("steps: 10 -> 20"), RunMismatchError("steps: 10 -> 20")])
def test_a_conflict_with_the_recorded_run_is_a_usage_error(err, capsys) -> None:
    assert run_job("train", ARGS, lambda a: a, fails_with(err)) == ExitCode.USAGE
    assert "dcfm train: error: steps: 10 -> 20" in capsys.readouterr().err


@pytest.mark.parametrize("err", [CheckpointError("s3://b/ckpt: no dcfm.json"), FileNotFoundError("data/x"),
                                 PermissionError("out/"), ValueError("split 'val' not in manifest"),
                                 JobFailure("the output s3://b/out is not writable (...)"),
                                 TransientFailure("probing s3://b/v.mp4", Fault.TRANSIENT, 6, 62.0, "ReadTimeoutError")])
def test_known_failures_print_one_line(err, capsys) -> None:
    assert run_job("evaluate", ARGS, lambda a: a, fails_with(err)) == ExitCode.JOB_FAILED
    err_text = capsys.readouterr().err
    assert err_text.startswith("dcfm evaluate: job failed:") and "Traceback" not in err_text


def test_unexpected_failures_print_the_traceback_and_how_to_resume(capsys) -> None:
    code = run_job("train", ARGS, lambda a: a, fails_with(RuntimeError("worker died")), "rerun to resume")
    err_text = capsys.readouterr().err
    assert code == ExitCode.JOB_FAILED
    assert "Traceback" in err_text and "RuntimeError: worker died" in err_text and "rerun to resume" in err_text


def test_argument_types() -> None:
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and parse_size("64x128") == (64, 128)
    for parse, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_int, "two"), (parse_size, "65x128"),
                        (parse_size, "64by128")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
