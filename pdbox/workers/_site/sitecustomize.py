# Put on a worker's PYTHONPATH by pdbox, so that what follows reaches every
# Python process the worker starts, whatever multiprocessing method vLLM uses.
import os as _os

if _os.environ.get("PDBOX_WORKER_TUNING"):
    # The worker tuning (see pdbox/workers/tuning.py).
    from pdbox.workers.tuning import install_from_env as _install

    _install()

if _os.environ.get("PDBOX_PARENT_PID"):
    # End the worker when its pdbox dies (see pdbox/workers/lifeline.py). After
    # the tuning, so that the watch thread is pinned with the process.
    from pdbox.workers.lifeline import install as _watch

    _watch()
