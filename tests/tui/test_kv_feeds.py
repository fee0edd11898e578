"""The autoscaler panel's KV-event feed lines: what the prefix scorer believes, per worker."""

from __future__ import annotations

from pdbox.tui.autoscaler_panel import render_kv_feeds


def test_each_worker_feed_state_and_faults_show() -> None:
    text = render_kv_feeds({
        "decode-0": {"state": "ok", "last_seq": 57, "blocks": 120, "gaps": 2, "replays": 1,
                     "clears": 1, "restarts": 1, "unapplied": 3},
        "prefill-0": {"state": "bind error", "last_seq": None, "blocks": 0},
    }).plain
    lines = text.splitlines()
    assert lines[0] == "kv events"
    assert lines[1] == ("decode-0 ok seq 57 · 120 blocks · gaps 2 (1 replayed, 1 cleared)"
                        " · restarts 1 · 3 unapplied")
    assert lines[2].startswith("prefill-0 bind error seq ")
