"""`gpujob` console script: a thin dispatcher; each sub-command lives beside the code it runs."""

from __future__ import annotations

import importlib
import sys

# sub-command -> "module:function"; each function takes argv (after the sub-command) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "operator": (
        "gpujob.entrypoints:operator_main",
        "run the kopf operator (and the Redis bridge if GPUJOB_REDIS_URL is set)",
    ),
    "bridge": ("gpujob.bridge.cli:bridge_main", "run only the Redis Stream intake bridge"),
    "submit": ("gpujob.bridge.cli:submit_main", "XADD a job request to the stream, print its jobId"),
    "watch": ("gpujob.bridge.cli:watch_main", "follow a job's progress events"),
    "schema": ("gpujob.bridge.cli:schema_main", "print JSON Schemas of the contracts (request, event)"),
    "worker": ("gpujob.worker.cli:main", "run a job inside its Pod (reads GPUJOB_JOB_* env)"),
    "sandbox": (
        "gpujob.sandbox.cli:main",
        "local control plane: API emulator or real Kubernetes (+ kubelets, redis, s3)",
    ),
    "kubelet": ("gpujob.sandbox.kubelet:main", "a sandbox node agent: runs its Node's Pods as local processes"),
}


EXIT_CODES = """exit codes (details: gpujob <command> --help, and the README):
  every command: 2 bad arguments or a missing setting
  submit:        0 in the stream; 69 Redis unreachable
  watch:         0 succeeded; 1 failed or cancelled; 3 --timeout; 4 rejected (dead-lettered); 69 Redis
                 unreachable or lost; 130 Ctrl-C
  worker:        the job's: 0 ok, 64 bad input, 69 GPUs unusable, 70 the task raised, 71 out of GPU memory,
                 75 transient (S3), 143 interrupted
  operator, bridge, sandbox, kubelet: 0 when stopped (SIGTERM, SIGINT); 1 (a traceback) when they cannot start
  schema:        0
  gpujob:        2 unknown command, or none"""


def _usage() -> str:
    lines = ["usage: gpujob <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join([*lines, "", EXIT_CODES])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from gpujob import __version__

        print(__version__)
        return 0
    target = COMMANDS.get(args[0])
    if target is None:
        print(f"gpujob: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = target[0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result: int = func(args[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())
