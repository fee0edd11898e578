"""`pdbox export llm-d`: golden manifests, offline schema validation, the key
round trip, bad input, and --replicas-from-status against a real HTTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pdbox.cli import main
from pdbox.config import builtin_names, load, load_text
from pdbox.export import build, render
from pdbox.export.llmd import epp_config_of
from pdbox.export.scheduler import integer_weights

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "export"
GOLDEN_PROFILES = ("cpu-tiny", "gh200-pd", "gpu-aggregated")


def objects_of(export: Any, kind: str) -> list[dict[str, Any]]:
    return [o for o in export.objects if o["kind"] == kind]


def one(export: Any, kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects_of(export, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (kind, name_suffix, [o["metadata"]["name"] for o in found])
    return found[0]


def vllm_container(deploy: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def leaf_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += leaf_keys(v, key + ".")
        else:
            out.append(key)
    return out


def scalars(obj: Any) -> set[str]:
    """Every key and scalar of the objects as text, embedded YAML and JSON parsed too."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(str(k))
            out |= scalars(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= scalars(v)
    else:
        out.add(str(obj))
        if isinstance(obj, str) and "\n" in obj:
            out |= scalars(yaml.safe_load(obj))
        elif isinstance(obj, str) and obj.startswith("{"):
            out |= scalars(json.loads(obj))  # --kv-transfer-config
    return out


# ------------------------------------------------------------------ goldens


@pytest.mark.parametrize("name", GOLDEN_PROFILES)
def test_golden_manifests(name: str) -> None:
    files = render.files(build(load(name)))
    folder = GOLDEN / name
    if os.environ.get("PDBOX_UPDATE_GOLDEN"):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for fname, text in files.items():
            (folder / fname).write_text(text, encoding="utf-8")
    expected = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}
    assert sorted(files) == sorted(expected), "set of files changed (PDBOX_UPDATE_GOLDEN=1)"
    for fname, text in files.items():
        assert text == expected[fname], f"{name}/{fname} differs (PDBOX_UPDATE_GOLDEN=1)"


def test_golden_stream_parses_back_to_the_objects() -> None:
    export = build(load("cpu-tiny"))
    docs = [d for d in yaml.safe_load_all(render.stream(export)) if d]
    assert docs == export.objects


# --------------------------------------------------------------- validation


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_profile_validates_offline(name: str) -> None:
    pytest.importorskip("kubernetes_validate")
    from pdbox.export.validate import validate

    assert validate(build(load(name))) == []


def test_validation_catches_schema_and_crd_errors() -> None:
    pytest.importorskip("kubernetes_validate")
    from pdbox.export.validate import validate

    export = build(load("cpu-tiny"))
    deploy = one(export, "Deployment", "-decode")
    vllm_container(deploy)["resourcez"] = {}  # unknown field: strict schemas refuse it
    pool = one(export, "InferencePool")
    del pool["spec"]["endpointPickerRef"]["port"]  # CEL rule of the CRD
    pool["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    hpa = one(export, "HorizontalPodAutoscaler", "-decode")
    hpa["spec"]["maxReplicas"] = "two"
    errors = validate(export)
    text = "\n".join(errors)
    assert "resourcez" in text
    assert "port is required" in text
    assert "must be unique" in text
    assert "maxReplicas" in text


def test_epp_config_reference_check() -> None:
    from pdbox.export.validate import validate_epp_config

    cfg = epp_config_of(build(load("cpu-tiny")))
    assert validate_epp_config(cfg) == []
    cfg["schedulingProfiles"][0]["plugins"].append({"pluginRef": "session-affinity-scorer"})
    cfg["plugins"] = [p for p in cfg["plugins"] if p["type"] != "prefix-based-pd-decider"]
    errors = validate_epp_config(cfg)
    assert any("session-affinity-scorer" in e for e in errors)
    assert any("decider 'prefix-based-pd-decider'" in e for e in errors)


def test_shipped_crd_schema_is_the_v1_pool() -> None:
    doc = json.loads(
        (
            Path(__file__).resolve().parents[2] / "pdbox/export/inferencepool-v1.schema.json"
        ).read_text()
    )
    spec = doc["schema"]["properties"]["spec"]
    assert doc["apiVersion"] == "inference.networking.k8s.io/v1"
    assert set(spec["required"]) == {"endpointPickerRef", "selector", "targetPorts"}


# ----------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", builtin_names())
def test_every_serving_key_is_in_the_output_or_the_warnings(name: str) -> None:
    profile = load(name)
    export = build(profile)
    keys = set(leaf_keys(profile.to_dict()))
    warned = {w.key for w in export.warnings}
    mapped = {m.key for m in export.mapped}
    ignored = {i.key: i.reason for i in export.ignored}
    unbooked = keys - warned - mapped - set(ignored)
    assert not unbooked, f"keys neither exported nor warned about: {sorted(unbooked)}"
    # Ignored keys are only those with no effect on serving for this profile.
    for key, reason in ignored.items():
        assert key in keys, key
        assert reason
        assert key not in warned
    # Every mapped value really is in the manifests.
    seen = scalars(export.objects)
    for m in export.mapped:
        if m.value is not None:
            assert m.value in seen, f"{m.key} -> {m.target}: {m.value!r} not in the manifests"


def test_mapped_values_follow_the_profile() -> None:
    profile = load("cpu-tiny")
    export = build(profile)
    cfg = epp_config_of(export)
    plugins = {p["type"]: p.get("parameters", {}) for p in cfg["plugins"]}
    assert plugins["approx-prefix-cache-producer"]["blockSizeTokens"] == profile.model.block_size
    assert plugins["approx-prefix-cache-producer"]["autoTune"] is False
    # cpu-tiny's gate is "auto" (from this box's speeds): llm-d gets the GPU
    # profiles' fixed count, with a warning that says so.
    assert profile.router.fixed_gate is None
    assert plugins["prefix-based-pd-decider"]["nonCachedTokens"] == 512
    assert any(w.key == "router.pd_min_uncached_tokens" for w in export.warnings)
    assert plugins["disagg-profile-handler"]["deciders"] == {"prefill": "prefix-based-pd-decider"}
    for prof in cfg["schedulingProfiles"]:
        weights = {p["pluginRef"]: p.get("weight") for p in prof["plugins"]}
        assert weights["prefix-cache-scorer"] == 3
        assert weights["queue-scorer"] == 2
        assert weights["kv-cache-utilization-scorer"] == 2
        assert f"{prof['name']}-filter" in weights

    decode = one(export, "Deployment", "-decode")
    c = vllm_container(decode)
    env = env_of(c)
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["UCX_TLS"] == "tcp,sm,self"
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "5Gi"}
    assert c["resources"]["limits"] == c["resources"]["requests"]
    kv = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "NixlConnector" and kv["kv_role"] == "kv_consumer"
    sidecar = decode["spec"]["template"]["spec"]["initContainers"][0]
    assert "--connector=nixlv2" in sidecar["args"] and sidecar["restartPolicy"] == "Always"
    assert decode["spec"]["template"]["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    assert "initContainers" not in one(export, "Deployment", "-prefill")["spec"]["template"]["spec"]

    hpa = one(export, "HorizontalPodAutoscaler", "-decode")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 2)
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert hpa["behavior"]["scaleUp"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 5}
    ]
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["metrics"]}
    assert targets["vllm_num_requests_waiting"]["averageValue"] == "4"
    assert targets["vllm_kv_cache_usage_perc"]["averageValue"] == "800m"

    pool = one(export, "InferencePool")
    labels = decode["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pool["spec"]["endpointPickerRef"]["name"] == one(export, "Service")["metadata"]["name"]


def test_kv_transfer_config_matches_the_local_workers() -> None:
    vllm_mod = pytest.importorskip("pdbox.workers.vllm")
    from pdbox.export.workers import kv_transfer_config

    profile = load("cpu-tiny")
    for role in ("prefill", "decode"):
        ours = kv_transfer_config(profile, role)
        ours.pop("kv_connector_extra_config")
        assert ours == vllm_mod.kv_transfer_config(profile, role)


def test_gpu_profile_resources_and_mps_warnings() -> None:
    export = build(load("gh200-pd"))
    prefill = vllm_container(one(export, "Deployment", "-prefill"))
    assert prefill["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    args = prefill["args"]
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.4"
    assert args[0] == "Qwen/Qwen2.5-7B-Instruct"
    warned = {w.key for w in export.warnings}
    assert {"prefill.sm_percent", "decode.sm_percent", "hardware.sharing"} <= warned
    assert "MPS" in next(w.message for w in export.warnings if w.key == "hardware.sharing")


def test_aggregated_profile_has_one_pool_without_pd() -> None:
    export = build(load("gpu-aggregated"))
    deploys = [d["metadata"]["name"] for d in objects_of(export, "Deployment")]
    assert deploys == ["pdbox-gpu-aggregated-epp", "pdbox-gpu-aggregated-aggregated"]
    cfg = epp_config_of(export)
    types = [p["type"] for p in cfg["plugins"]]
    assert "single-profile-handler" in types and "disagg-profile-handler" not in types
    args = vllm_container(objects_of(export, "Deployment")[1])["args"]
    assert "--kv-transfer-config" not in args
    # autoscaler keys of a profile without [autoscaler] still map to the defaults
    assert objects_of(export, "HorizontalPodAutoscaler")


# ------------------------------------------------------------------ bad input

ODD_PROFILE = """
name = "odd"
[model]
source = "Qwen/Qwen2.5-7B-Instruct"
served_name = "qwen"
block_size = 16
[hardware]
device = "cuda"
sharing = "mps"
[mode]
kind = "pd"
[prefill]
replicas = 1
min = 0
max = 2
sm_percent = 30
memory_fraction = 0.2
[decode]
replicas = 1
min = 1
max = 2
sm_percent = 70
memory_fraction = 0.2
[nixl]
ucx_tls = "cuda_ipc,sm,self"
buffer_device = "cuda"
[router]
policy = "round_robin"
pd_min_uncached_tokens = 0
pd_decider = "threshold"
kv_events = false
[autoscaler]
tolerance = 0.25
scale_down_window_s = 7200
resplit = true
"""


def test_inexpressible_keys_each_get_a_warning() -> None:
    export = build(load_text(ODD_PROFILE, "odd.toml"))
    warned = {w.key for w in export.warnings}
    for key in (
        "prefill.sm_percent",
        "decode.sm_percent",
        "prefill.min",
        "nixl.ucx_tls",
        "router.policy",
        "autoscaler.tolerance",
        "autoscaler.scale_down_window_s",
        "autoscaler.resplit",
        "autoscaler.panic_window_s",
        "autoscaler.panic_threshold",
    ):
        assert key in warned, key
    hpa = one(export, "HorizontalPodAutoscaler", "-prefill")["spec"]
    assert hpa["minReplicas"] == 1
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 3600
    cfg = epp_config_of(export)
    types = [p["type"] for p in cfg["plugins"]]
    assert "random-picker" in types and "always-disagg-pd-decider" in types
    assert "prefix-cache-scorer" not in types


def test_weights_become_whole_numbers_with_the_same_ratios() -> None:
    assert integer_weights({"prefix": 3.0, "queue": 2.0, "kv": 2.0}) == (
        {"prefix": 3, "queue": 2, "kv": 2},
        True,
    )
    assert integer_weights({"prefix": 1.5, "queue": 1.0, "kv": 0.5}) == (
        {"prefix": 3, "queue": 2, "kv": 1},
        True,
    )


# ------------------------------------------------------------------------ CLI


def test_cli_writes_one_file_per_object_and_replaces_stale_ones(tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    out.mkdir()
    stale = out / "99-deployment-old.yaml"
    stale.write_text(render.HEADER_MARK + ": profile old\n")
    mine = out / "kustomization.yaml"
    mine.write_text("resources: []\n")
    r = CliRunner().invoke(main, ["export", "llm-d", "--profile", "cpu-tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert "warnings.txt" in names and "kustomization.yaml" in names
    assert "99-deployment-old.yaml" not in names
    assert "06-deployment-pdbox-cpu-tiny-prefill.yaml" in names
    assert "warning: nixl.progress_delay_us" in r.output


def test_cli_json_and_user_errors() -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["export", "llm-d", "--profile", "gh200-pd", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert {w["key"] for w in doc["warnings"]} >= {"prefill.sm_percent"}
    assert any(o["kind"] == "InferencePool" for o in doc["objects"])
    r = runner.invoke(main, ["export", "llm-d", "--profile", "gh200"])
    assert r.exit_code != 0 and "no such built-in profile" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(main, ["export", "llm-d", "--profile", "cpu-tiny", "--namespace", "Bad_NS"])
    assert r.exit_code == 2


def test_export_imports_neither_torch_nor_vllm() -> None:
    code = (
        "import sys\n"
        "from pdbox.config import load\n"
        "from pdbox.export import build, render\n"
        "render.stream(build(load('gh200-pd')))\n"
        "bad = [m for m in ('torch', 'vllm', 'textual') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --------------------------------------------------------- replicas from status


class _Status(BaseHTTPRequestHandler):
    token = "s3cret"
    body: dict[str, Any] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        if self.path != "/pdbox/v1/status":
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(self.body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def running_pdbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    home = tmp_path / "home"
    run = home / "run"
    run.mkdir(parents=True)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    state = {"pid": os.getpid(), "control_url": url, "endpoint": url + "/v1", "profile": "cpu-tiny"}
    (run / "state.json").write_text(json.dumps(state))
    (run / "control.token").write_text(_Status.token + "\n")
    monkeypatch.setenv("PDBOX_HOME", str(home))
    yield run
    server.shutdown()
    server.server_close()


def test_replicas_from_status_uses_the_autoscalers_counts(running_pdbox: Path) -> None:
    _Status.body = {
        "profile": "cpu-tiny",
        "autoscaler": {
            "enabled": True,
            "roles": {
                "decode": {"current": 2, "desired": 2, "min": 1, "max": 2, "pinned": None},
                "prefill": {"current": 1, "desired": 1, "min": 1, "max": 1, "pinned": None},
            },
        },
    }
    r = CliRunner().invoke(
        main, ["export", "llm-d", "--profile", "cpu-tiny", "--replicas-from-status", "--json"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    replicas = {
        o["metadata"]["name"]: o["spec"]["replicas"]
        for o in doc["objects"]
        if o["kind"] == "Deployment"
    }
    assert replicas["pdbox-cpu-tiny-decode"] == 2
    assert replicas["pdbox-cpu-tiny-prefill"] == 1
    assert doc["replicas_from_status"] == {"prefill": 1, "decode": 2}


def test_replicas_from_status_keeps_the_profile_for_unlisted_roles(running_pdbox: Path) -> None:
    _Status.body = {"profile": "other", "autoscaler": {"roles": {"decode": {"current": 2}}}}
    r = CliRunner().invoke(
        main, ["export", "llm-d", "--profile", "cpu-tiny", "--replicas-from-status"]
    )
    assert r.exit_code == 0, r.output
    assert "no count for prefill" in r.output and "serves profile 'other'" in r.output
    assert "# replicas from the running pdbox: decode 2" in r.output


def test_replicas_from_status_with_a_wrong_token_is_one_sentence(running_pdbox: Path) -> None:
    (running_pdbox / "control.token").write_text("wrong\n")
    r = CliRunner().invoke(
        main, ["export", "llm-d", "--profile", "cpu-tiny", "--replicas-from-status"]
    )
    assert r.exit_code == 1
    assert "answered 401" in r.output and "Traceback" not in r.output


def test_replicas_from_status_when_pdbox_is_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDBOX_HOME", str(tmp_path))
    r = CliRunner().invoke(
        main, ["export", "llm-d", "--profile", "cpu-tiny", "--replicas-from-status"]
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: pdbox is not running (start it with: pdbox up); "
        "--replicas-from-status needs a running pdbox"
    )
