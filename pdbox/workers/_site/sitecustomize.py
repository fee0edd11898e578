# Put on a worker's PYTHONPATH by pdbox so that its tuning (see
# pdbox/workers/tuning.py) reaches every Python process the worker starts.
import os as _os

if _os.environ.get("PDBOX_WORKER_TUNING"):
    from pdbox.workers.tuning import install_from_env as _install

    _install()
