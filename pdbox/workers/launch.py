"""`python -m pdbox.workers.launch <vllm args>`: a vLLM OpenAI server with
pdbox's worker tuning applied first.

The version check happens here, in the worker's first process, so that a
changed vllm or nixl stops the worker with one clear line in its log (which
the supervisor shows) instead of a silently untuned worker.
"""

from __future__ import annotations

import os
import runpy
import sys

from pdbox.workers.tuning import ENV, Tuning, TuningError, check_versions

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
EXIT_TUNING = 78  # EX_CONFIG


def main(argv: list[str]) -> None:
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
