"""`python -m pdbox.workers.launch <vllm args>`: a vLLM OpenAI server with
pdbox's worker tuning applied first.

The version check happens here, in the worker's first process, so that a
changed vllm or nixl stops the worker with one clear line in its log (which
the supervisor shows) instead of a silently untuned worker.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

from pdbox.workers.tuning import ENV, Tuning, TuningError, check_versions

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
EXIT_TUNING = 78  # EX_CONFIG
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this worker when the pdbox that started it dies, even by SIGKILL.

    vLLM's API server answers SIGTERM by stopping its engine-core children, so
    a crashed pdbox leaves no worker behind. What does not follow that way (a
    hung server, an engine core still loading the model) is ended by the
    lifeline every process of the worker runs (lifeline.py); the recorded
    process groups are the last line of defence, for the next `pdbox up`.
    """
    parent = os.environ.get("PDBOX_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        raise SystemExit(0)


def main(argv: list[str]) -> None:
    die_with_parent()
    text = os.environ.get(ENV)
    if text:
        tuning = Tuning.from_env(text)
        try:
            check_versions(tuning.expect)
        except TuningError as exc:
            print(f"pdbox: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_TUNING) from None
        # sitecustomize already installed the hooks in this process; install()
        # is idempotent for modules already patched.
    sys.argv = [SERVER_MODULE, *argv]
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
