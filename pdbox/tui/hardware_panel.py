"""GPU and CPU telemetry. Every figure may be null; it then reads N/A."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from pdbox.tui import format as fmt

BAR = 16


def render_hardware(h: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    gpus = h.get("gpus")
    if not gpus:
        grid.add_row("GPU", Text("N/A (none found)", style="dim"))
    for g in gpus or []:
        util = g.get("util_percent")
        mem_used, mem_total = g.get("memory_used_bytes"), g.get("memory_total_bytes")
        frac = mem_used / mem_total if fmt.is_num(mem_used) and fmt.is_num(mem_total) \
            and mem_total else None
        grid.add_row(f"GPU{fmt.integer(g.get('index'))}", str(g.get("name") or fmt.NA))
        grid.add_row("  util", f"{fmt.bar(util / 100 if fmt.is_num(util) else None, BAR)} "
                     f"{fmt.num(util, '.0f', '%')}")
        grid.add_row("  mem", f"{fmt.bar(frac, BAR)} {fmt.used_of(mem_used, mem_total)}")
        grid.add_row("  power", f"{fmt.num(g.get('power_w'), '.0f', ' W')} · "
                     f"SM {fmt.num(g.get('sm_clock_mhz'), '.0f', ' MHz')}")
        for p in g.get("processes") or []:
            grid.add_row("", Text(f"pid {fmt.integer(p.get('pid'))} "
                                  f"{fmt.gib(p.get('memory_bytes'))} GiB", style="dim"))
    mps = h.get("mps")
    if isinstance(mps, dict) and mps.get("enabled"):
        state = "running" if mps.get("running") else "not running"
        grid.add_row("MPS", f"{state} · {mps.get('pipe_dir') or fmt.NA}")
    elif gpus:
        grid.add_row("MPS", "off")
    cores = h.get("cpu_percent_per_core")
    if isinstance(cores, list) and cores:
        for i, c in enumerate(cores):
            grid.add_row(f"cpu{i}", f"{fmt.bar(c / 100 if fmt.is_num(c) else None, BAR)} "
                         f"{fmt.num(c, '.0f', '%')}")
    else:
        grid.add_row("CPU", fmt.NA)
    used, total = h.get("memory_used_bytes"), h.get("memory_total_bytes")
    frac = used / total if fmt.is_num(used) and fmt.is_num(total) and total else None
    grid.add_row("mem", f"{fmt.bar(frac, BAR)} {fmt.used_of(used, total)}")
    dtype = h.get("dtype")
    if isinstance(dtype, dict) and dtype.get("dtype"):
        style = "yellow" if dtype.get("warning") else ""
        grid.add_row("dtype", Text(str(dtype["dtype"]), style=style or "bold"))
        grid.add_row("", Text(str(dtype.get("warning") or dtype.get("reason") or ""),
                              style=style or "dim", overflow="fold"))
    for key, cal in (h.get("calibration") or {}).items():
        steps = cal.get("decode_step_s") or {}
        step = " / ".join(f"{fmt.num(1000 * v, '.0f')}" for _, v in
                          sorted(steps.items(), key=lambda kv: int(kv[0]))
                          if fmt.is_num(v))
        grid.add_row("calib", Text(str(key).split(" · ")[0], style="bold"))
        grid.add_row("", f"prefill {fmt.num(cal.get('prefill_tps'), ',.0f')} tok/s")
        grid.add_row("", f"step {step or fmt.NA} ms at "
                     f"{'/'.join(sorted(steps, key=int)) or fmt.NA} streams")
    return grid


class HardwarePanel(Static):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last: Any = None

    def on_mount(self) -> None:
        self.border_title = "Hardware"

    def apply(self, hardware: dict[str, Any] | None) -> None:
        hardware = hardware or {}
        if hardware == self._last:
            return
        self._last = hardware
        self.update(render_hardware(hardware))
