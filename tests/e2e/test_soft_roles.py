"""Soft roles on real cpu-tiny workers (issue 15), one pdbox start for every check.

1. While it has no prefill work, the prefill worker (vLLM `kv_producer`)
   serves short requests whole: plain requests without kv_transfer_params.
2. Then long prompts come, one every 1.5 s, with short streams starting
   beside them: every long prompt is prefilled remotely, and no stream is
   placed on the prefill worker while it prefills.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

import pytest

from tests.e2e.conftest import profile_variant

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    from tests.e2e.conftest import start_pdbox, stop_group

    tmp = tmp_path_factory.mktemp("soft")
    prof = profile_variant(tmp, "cpu-tiny", "cpu-tiny-soft", **{"autoscaler.enabled": "false"})
    box = start_pdbox(tmp, ["--profile", str(prof)])
    yield box
    stop_group(box.proc)


def _post(endpoint: str, path: str, body: dict[str, Any], out: list, tag: str) -> None:
    """POST a request, read the whole answer; append (tag, headers, text, started, ended)."""
    t0 = time.monotonic()
    req = urllib.request.Request(f"{endpoint}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        raw = r.read().decode()
        heads = {k.lower(): v for k, v in r.headers.items()}
    if body.get("stream"):
        text = "".join(
            (json.loads(line[6:])["choices"] or [{}])[0].get("text")
            or (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
            for line in raw.splitlines()
            if line.startswith("data: ") and "[DONE]" not in line)
    else:
        choice = json.loads(raw)["choices"][0]
        text = choice.get("text") or choice.get("message", {}).get("content") or ""
    out.append((tag, heads, text, t0, time.monotonic()))


def _chat(content: str, max_tokens: int) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0}


def _idle(box, timeout: float = 120) -> None:
    box.wait_worker(lambda s: all((w.get("inflight") or 0) == 0 for w in s["workers"]),
                    timeout=timeout)


def test_prefill_worker_serves_whole_short_requests_while_idle(soft):
    _idle(soft)
    out: list = []
    threads = [threading.Thread(target=_post, daemon=True,
                                args=(soft.endpoint, "/chat/completions",
                                      _chat(f"Name a colour ({i}).", 24), out, f"chat{i}"))
               for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(300)
    assert len(out) == 4
    whole = [o for o in out if o[1].get("x-pdbox-pd") == "whole"]
    print("\nidle box:", [(o[0], o[1].get("x-pdbox-decode-worker"), o[1].get("x-pdbox-pd"))
                          for o in out])
    assert whole, f"no short request was served whole: {[o[1] for o in out]}"
    for tag, heads, text, _, _ in whole:
        assert heads["x-pdbox-decode-worker"] == "prefill-0"
        assert "soft role" in heads["x-pdbox-pd-reason"]
        assert text.strip(), f"{tag}: the prefill worker's whole answer was empty"
    # A plain request straight to the kv_producer worker is served end to end as well.
    pre = next(w for w in soft.status()["workers"] if w["role"] == "prefill")
    got: list = []
    _post(f"http://127.0.0.1:{pre['port']}/v1", "/completions",
          {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8,
           "temperature": 0}, got, "direct")
    assert got[0][2].strip()
    mix = soft.status()["router"]["soft_roles"]["role_mix"]["prefill-0"]
    assert mix["whole"] > 0, mix


def test_long_prompts_go_remote_and_no_stream_lands_on_the_prefiller(soft):
    from pdbox.smoke import unique_text

    _idle(soft)
    out: list = []
    threads = []

    def go(path: str, body: dict[str, Any], tag: str) -> None:
        t = threading.Thread(target=_post, daemon=True,
                             args=(soft.endpoint, path, body, out, tag))
        t.start()
        threads.append(t)

    for i in range(3):  # ~600 unique tokens each, one every 1.5 s
        go("/completions", {"model": "smollm2", "prompt": unique_text(500), "max_tokens": 8,
                            "temperature": 0}, f"long{i}")
        time.sleep(0.5)
        go("/chat/completions", _chat(f"Tell me about the number {i}.", 40), f"chat{i}")
        time.sleep(1.0)
    for t in threads:
        t.join(300)
    rows = [(o[0], o[1].get("x-pdbox-pd"), o[1].get("x-pdbox-decode-worker"),
             o[1].get("x-pdbox-pd-reason", "")[:120]) for o in sorted(out)]
    print("\nlong prompts beside streams:", *rows, sep="\n  ")
    assert len(out) == 6
    for tag, heads, text, _, _ in out:
        if tag.startswith("long"):
            assert heads["x-pdbox-pd"] == "remote", rows
            assert heads["x-pdbox-prefill-worker"] == "prefill-0", rows
        else:
            assert heads["x-pdbox-decode-worker"] == "decode-0", rows
            assert "kept for prefill" in heads["x-pdbox-pd-reason"], rows
        assert text.strip(), f"{tag}: empty answer"


def test_forced_resplit_answers_every_request(soft):
    """`pdbox scale split 1/0` swaps the two cores: prefill stops, then starts on core 1
    (decode serves every request meanwhile), then decode does the same onto core 0
    (the prefill worker serves every request whole meanwhile). Requests keep coming
    the whole time, and every one is answered."""
    import os
    import subprocess
    import sys

    from pdbox.smoke import unique_text

    _idle(soft)
    out: list = []
    errors: list = []
    stop = threading.Event()

    def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            long = n % 4 == 0
            body = ({"model": "smollm2", "prompt": unique_text(400), "max_tokens": 8,
                     "temperature": 0} if long else _chat(f"Say a word ({i}.{n}).", 12))
            try:
                _post(soft.endpoint, "/completions" if long else "/chat/completions", body,
                      out, f"load{i}.{n}")
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none hidden
                errors.append((f"load{i}.{n}", repr(exc)))
            time.sleep(0.3)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    env = dict(os.environ, PDBOX_HOME=str(soft.home))
    cli = subprocess.run([sys.executable, "-m", "pdbox.cli", "scale", "split", "1/0"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "re-splitting" in cli.stdout
    try:
        final = soft.wait_worker(lambda s: not s["autoscaler"]["split"]["moving"]
                                 and s["autoscaler"]["split"]["split"]
                                 == "prefill cores 1 / decode cores 0"
                                 and all(w["state"] == "ready" for w in s["workers"]),
                                 timeout=600)
        time.sleep(3)  # a few requests on the new split
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    events = [e.get("message", "") for e in final.get("events", [])]
    print("\nre-split events:", *[e for e in events if "split" in e], sep="\n  ")
    print(f"requests answered during the re-split: {len(out)}, failed: {errors}")
    assert not errors, errors
    assert len(out) >= 10
    assert all(o[2].strip() for o in out), [o[0] for o in out if not o[2].strip()]
    kinds = {o[1].get("x-pdbox-pd") for o in out}
    assert "whole" in kinds, f"the prefill worker never served alone: {kinds}"
    cores = {w["role"]: w["cores"] for w in final["workers"]}
    assert cores == {"prefill": "1", "decode": "0"}, cores
    assert any(e.startswith("re-split done") for e in events), events
