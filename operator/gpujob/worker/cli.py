"""`gpujob worker`: run the job described by GPUJOB_JOB_* in this Pod and exit with a documented code."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from types import FrameType

from pydantic import ValidationError

from gpujob.api import ExitCode
from gpujob.api.constants import TERMINATION_MESSAGE_PATH
from gpujob.logging import configure, get_logger
from gpujob.settings import Settings
from gpujob.worker import result
from gpujob.worker.task import available, describe

# After SIGTERM a task gets this long to reach a step boundary; past it we exit anyway, so a task stuck
# in a long call can't outlive the Pod's grace period (30 s by default) and be SIGKILLed with no result.
STOP_GRACE_SECONDS = 20.0


def _offline() -> None:
    """Never a hub download: models come only from the models volume."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _install_stop_handler(stop: threading.Event, termination_path: str) -> None:
    def hard_exit() -> None:
        message = f"task did not stop within {STOP_GRACE_SECONDS:.0f}s of SIGTERM"
        result.write(termination_path, result.render([], {}, message, ExitCode.INTERRUPTED))
        get_logger("gpujob.worker").error("forced exit", reason=message)
        os._exit(ExitCode.INTERRUPTED)

    def on_signal(signum: int, _: FrameType | None) -> None:
        if stop.is_set():
            return
        stop.set()
        get_logger("gpujob.worker").warning(
            "stop requested; checkpoint at the next step boundary", signal=signal.Signals(signum).name
        )
        timer = threading.Timer(STOP_GRACE_SECONDS, hard_exit)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpujob worker", description=__doc__)
    parser.add_argument("--list-tasks", action="store_true", help="print the installed task types and exit")
    args = parser.parse_args(argv)
    if args.list_tasks:
        print("\n".join(available()))
        return ExitCode.OK
    _offline()
    try:
        settings = Settings()
    except ValidationError as exc:
        configure()
        message = f"invalid GPUJOB_* settings: {describe(exc)}"
        get_logger("gpujob.worker").error("job ended", exit_code=ExitCode.BAD_INPUT, error=message)
        # The path setting itself may be what failed to parse: read it raw here, and only here.
        path = os.environ.get("GPUJOB_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH)
        result.write(path, result.render([], {}, message, ExitCode.BAD_INPUT))
        return ExitCode.BAD_INPUT
    configure(settings.log_format, settings.log_level)
    stop = threading.Event()
    _install_stop_handler(stop, settings.termination_message_path)
    from gpujob.worker.runtime import run_job  # torch loads only past argument parsing

    outcome = run_job(settings, stop)
    text = result.render(outcome.artifacts, outcome.metrics, outcome.error, outcome.exit_code)
    result.write(settings.termination_message_path, text)
    return outcome.exit_code
