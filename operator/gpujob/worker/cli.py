"""`gpujob worker`: run the job described by GPUJOB_JOB_* in this Pod and exit with a documented code."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from pydantic import ValidationError

from gpujob.api import ExitCode
from gpujob.api.constants import TERMINATION_MESSAGE_PATH
from gpujob.logging import configure, get_logger
from gpujob.settings import Settings
from gpujob.worker import result
from gpujob.worker.credential_files import with_credential_files
from gpujob.worker.env import WorkerEnv
from gpujob.worker.task import available, describe

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_finishing = threading.Lock()  # the worker's own result and the watchdog's forced exit exclude each other


def _offline() -> None:
    """Never a hub download: models come only from the models volume."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _install_stop_watchdog(stop: threading.Event, done: threading.Event, path: str, budget: float) -> None:
    """SIGTERM/SIGINT go to a thread of their own (blocked everywhere else, received with sigwait), so they
    are seen at once even while the main thread is inside a long CUDA call, where a Python signal handler
    would not run until the call returns. That thread sets `stop` (the task checkpoints at its next step
    boundary) and, if the worker has not finished `budget` seconds later, writes the result and exits 143,
    inside the Pod's grace period, instead of being SIGKILLed with no result."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # before any other thread starts: they inherit it

    def watch() -> None:
        signum = signal.sigwait(STOP_SIGNALS)
        stop.set()
        log = get_logger("gpujob.worker")
        log.warning("stop requested; checkpoint at the next step boundary", signal=signal.Signals(signum).name)
        if done.wait(budget) or not _finishing.acquire(blocking=False):
            return
        message = (
            f"task did not reach a step boundary within {budget:.0f}s of SIGTERM; "
            "the next attempt resumes from the newest periodic checkpoint, if any"
        )
        result.write(path, result.render([], {}, message, ExitCode.INTERRUPTED))
        log.error("forced exit", reason=message)
        os._exit(ExitCode.INTERRUPTED)

    threading.Thread(target=watch, name="gpujob-stop-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpujob worker", description=__doc__)
    parser.add_argument("--list-tasks", action="store_true", help="print the installed task types and exit")
    args = parser.parse_args(argv)
    if args.list_tasks:
        print("\n".join(available()))
        return ExitCode.OK
    _offline()
    try:
        settings = with_credential_files(Settings())  # the job's own, from its Secret
    except ValidationError as exc:
        configure()
        message = f"invalid GPUJOB_* settings: {describe(exc)}"
        get_logger("gpujob.worker").error("job ended", exit_code=ExitCode.BAD_INPUT, error=message)
        # The path setting itself may be what failed to parse: read it raw here, and only here.
        path = os.environ.get("GPUJOB_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH)
        result.write(path, result.render([], {}, message, ExitCode.BAD_INPUT))
        return ExitCode.BAD_INPUT
    try:
        env = WorkerEnv()
    except ValidationError as exc:
        configure()
        message = f"invalid GPUJOB_* settings: {describe(exc)}"
        get_logger("gpujob.worker").error("job ended", exit_code=ExitCode.BAD_INPUT, error=message)
        result.write(settings.termination_message_path, result.render([], {}, message, ExitCode.BAD_INPUT))
        return ExitCode.BAD_INPUT
    configure(settings.log_format, settings.log_level)
    stop, done = threading.Event(), threading.Event()
    _install_stop_watchdog(stop, done, settings.termination_message_path, env.stop_budget)
    from gpujob.worker.runtime import run_job  # torch loads only past argument parsing

    outcome = run_job(settings, stop, env)
    with _finishing:
        done.set()
    text = result.render(outcome.artifacts, outcome.metrics, outcome.error, outcome.exit_code, outcome.device)
    result.write(settings.termination_message_path, text)
    return outcome.exit_code
