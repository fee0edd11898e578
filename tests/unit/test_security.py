"""Security defaults: loopback bind, API key off loopback, control token, file
modes, prompts kept out of logs, and profiles that cannot inject commands."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdbox import config
from pdbox.workers import vllm as vllm_spec
from pdbox.workers.supervisor import PopenLauncher
from tests.faults.conftest import (
    AttachedPdbox,
    LiveBox,
    MockProcess,
    http_json,
    small_profile,
    start_attached_pdbox,
    start_mock_process,
)


@pytest.fixture
def mock() -> Iterator[MockProcess]:
    m = start_mock_process()
    yield m
    m.stop()


@pytest.fixture
def attached(tmp_path: Path, mock: MockProcess) -> Iterator[AttachedPdbox]:
    b = start_attached_pdbox(tmp_path, [mock.url])
    yield b
    b.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------- binding


def test_default_bind_is_loopback() -> None:
    for name in config.builtin_names():
        assert config.load(name).router.host == "127.0.0.1", name


def test_public_bind_without_api_key_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env_key = {k: v for k, v in os.environ.items() if k != "PDBOX_API_KEY"}
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        out = subprocess.run(
            [sys.executable, "-m", "pdbox.cli", "up", "--headless", "--host", host,
             "--attach", "http://127.0.0.1:9"],
            env={**env_key, "PDBOX_HOME": str(home)}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "API key" in out.stderr and "PDBOX_API_KEY" in out.stderr
        assert "Traceback" not in out.stderr
    assert not (home / "run").exists()


def test_api_key_guards_the_openai_routes(tmp_path: Path) -> None:
    box = LiveBox(tmp_path / "run", api_key="s3cret-key").start()
    try:
        body = b'{"model": "smollm2", "prompt": "hi", "max_tokens": 2}'
        h = {"Content-Type": "application/json"}
        for auth in (None, "Bearer wrong", "s3cret-key", "Bearer s3cret-key2", "Basic s3cret-key"):
            hh = dict(h, **({"Authorization": auth} if auth else {}))
            status, _, raw = box.request("POST", "/v1/completions", body, hh)
            assert status == 401, (auth, raw)
        status, _, _ = box.request("GET", "/v1/models")
        assert status == 401
        status, _, _ = box.request("POST", "/v1/completions", body,
                                   dict(h, Authorization="Bearer s3cret-key"))
        assert status == 200
        # Health stays open for probes; the control API has its own token.
        assert box.request("GET", "/health")[0] == 200
    finally:
        box.stop()


# ------------------------------------------------------------- control token


def test_control_token_required_for_scale_and_policy(attached: AttachedPdbox) -> None:
    base = attached.base
    for path, body in (("/pdbox/v1/scale", {"role": "aggregated", "replicas": 1}),
                       ("/pdbox/v1/policy", {"policy": "round_robin"}),
                       ("/pdbox/v1/shutdown", {})):
        code, _ = http_json(f"{base}{path}", body)
        assert code == 401
        code, _ = http_json(f"{base}{path}", body, {"Authorization": "Bearer nope"})
        assert code == 401
    code, out = http_json(f"{base}/pdbox/v1/policy", {"policy": "round_robin"},
                          {"Authorization": f"Bearer {attached.token()}"})
    assert code == 200 and out == {"policy": "round_robin"}
    assert attached.proc.poll() is None


def test_run_folder_and_log_modes(attached: AttachedPdbox) -> None:
    run = attached.home / "run"
    assert mode(run) == 0o700
    assert mode(run / "logs") == 0o700
    for name in ("control.token", "state.json", "logs/pdbox.log"):
        assert mode(run / name) == 0o600, name


def test_worker_logs_are_private(tmp_path: Path) -> None:
    spec = vllm_spec.WorkerSpec(id="decode-0", role="decode", index=0, argv=["true"],
                                env=dict(os.environ),
                                ports=vllm_spec.WorkerPorts(http=1, side_channel=0, kv_events=0))
    log = tmp_path / "w.log"
    proc = PopenLauncher().spawn(spec, log)
    proc.popen.wait(10)  # type: ignore[attr-defined]
    assert mode(log) == 0o600


def test_prompts_and_completions_stay_out_of_logs(attached: AttachedPdbox) -> None:
    marker = "zebra-quokka-7731"
    for path, body in (("/chat/completions", {"model": "smollm2", "max_tokens": 4,
                                              "messages": [{"role": "user", "content": marker}]}),
                       ("/completions", {"model": "smollm2", "prompt": marker, "max_tokens": 4}),
                       ("/completions", {"model": "nope", "prompt": marker}),
                       ("/chat/completions", {"model": "smollm2", "messages": marker})):
        http_json(f"{attached.endpoint}{path}", body)
    attached.stop()
    texts = [attached.stderr()]
    for p in (attached.home / "run").rglob("*"):
        if p.is_file():
            texts.append(p.read_text(errors="replace"))
    assert not [t for t in texts if marker in t]


# ------------------------------------------------------------------ profiles


INJECTIONS = [
    "--max-num-seqs=4; rm -rf /", "--max-num-seqs=$(id)", "--max-num-seqs=`id`",
    "--max-num-seqs=4 && id", "--max-num-seqs=4 | id", "--x\n--port=1", "--x=a>b",
    "--trust-remote-code", "--trust_remote_code", "--trust-remote", "--port=1", "--host 0.0.0.0",
    "--kv-transfer-config={}", "--kv-transfer", "--api-key=x", "--config=/etc/passwd",
    "--chat-template=/etc/passwd", "--model=/tmp/evil", "--uds=/tmp/s",
]


def _profile_with(tmp: Path, extra: str, allow_trust: bool = False) -> Path:
    text = (Path(config.BUILTIN_DIR) / "cpu-tiny.toml").read_text()
    text = text.replace("extra_args = []", f"extra_args = [{extra}]"
                        + ("\nallow_trust_remote_code = true" if allow_trust else ""))
    p = tmp / "evil.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("arg", INJECTIONS)
def test_profile_extra_args_cannot_inject(tmp_path: Path, arg: str) -> None:
    import json

    with pytest.raises(config.ProfileError) as exc:
        config.load(str(_profile_with(tmp_path, json.dumps(arg))))
    assert "engine.extra_args" in str(exc.value)


def test_trust_remote_code_only_when_allowed(tmp_path: Path) -> None:
    p = config.load(str(_profile_with(tmp_path, '"--trust-remote-code"', allow_trust=True)))
    assert p.engine.extra_args == ("--trust-remote-code",) or \
        list(p.engine.extra_args) == ["--trust-remote-code"]


def test_argv_is_a_list_with_each_extra_arg_one_item(tmp_path: Path) -> None:
    p = config.load(str(_profile_with(tmp_path, '"--max-num-seqs=4", "--seed=7"')))
    ports = vllm_spec.WorkerPorts(http=8100, side_channel=5600, kv_events=0)
    spec = vllm_spec.build(p, "decode", 0, ports, "/models/x", online_cores=[0, 1])
    assert isinstance(spec.argv, list) and all(isinstance(a, str) for a in spec.argv)
    assert "--max-num-seqs=4" in spec.argv and "--seed=7" in spec.argv
    assert spec.argv.count("--port") == 1


def test_model_paths_are_checked(tmp_path: Path) -> None:
    text = (Path(config.BUILTIN_DIR) / "cpu-tiny.toml").read_text()
    for src in ("/nonexistent/model", "org/name; rm -rf /", "$(id)/x", "../../etc"):
        p = tmp_path / "m.toml"
        p.write_text(text.replace('"embedded:smollm2-135m-instruct"', f'"{src}"'))
        with pytest.raises(config.ProfileError) as exc:
            config.load(str(p))
        assert "model.source" in str(exc.value)


def test_no_shell_anywhere_workers_are_started() -> None:
    root = Path(__file__).resolve().parents[2] / "pdbox"
    offenders = [str(p) for p in root.rglob("*.py")
                 if "shell=True" in p.read_text() or "os.system(" in p.read_text()]
    assert not offenders


def test_small_profile_helper_is_loopback() -> None:
    assert small_profile().router.host == "127.0.0.1"


def test_public_bind_with_key_serves_and_requires_it(tmp_path: Path, mock: MockProcess) -> None:
    env_backup = os.environ.get("PDBOX_API_KEY")
    os.environ["PDBOX_API_KEY"] = "k-123"
    try:
        box = start_attached_pdbox(tmp_path, [mock.url], "--host", "0.0.0.0")
    finally:
        if env_backup is None:
            os.environ.pop("PDBOX_API_KEY", None)
        else:
            os.environ["PDBOX_API_KEY"] = env_backup
    try:
        body = {"model": "smollm2", "prompt": "hi", "max_tokens": 2}
        code, _ = http_json(f"{box.endpoint}/completions", body)
        assert code == 401
        code, _ = http_json(f"{box.endpoint}/completions", body, {"Authorization": "Bearer k-123"})
        assert code == 200
    finally:
        box.stop()
