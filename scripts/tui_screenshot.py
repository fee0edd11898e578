#!/usr/bin/env python3
"""Render the TUI to docs/tui.png.

By default it renders the realistic snapshot the TUI tests use (tests/tui/tui_fakes.py);
with --live it attaches to the running pdbox through its control API, so the picture
shows real traffic. Textual writes an SVG; rsvg-convert (apt: librsvg2-bin) or cairosvg
turns it into a PNG.

    python scripts/tui_screenshot.py [--live] [--out docs/tui.png] [--size 160x48]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdbox.tui.app import PdboxApp  # noqa: E402


def fake_source() -> Any:
    spec = importlib.util.spec_from_file_location("tui_fakes", ROOT / "tests/tui/tui_fakes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeSource()


async def render(source: Any, svg: Path, size: tuple[int, int], settle_s: float) -> None:
    app = PdboxApp(source, owns_server=False)
    async with app.run_test(size=size) as pilot:
        for _ in range(int(settle_s / 0.05)):
            if app.ticks >= 1 and app.log_panel.tail_worker:
                break
            await pilot.pause(0.05)
        if app.ticks < 1:
            raise SystemExit(f"no status from pdbox: {app.error or 'timed out'}")
        await pilot.pause(0.3)
        app.save_screenshot(filename=svg.name, path=str(svg.parent))


def to_png(svg: Path, png: Path) -> None:
    if shutil.which("rsvg-convert"):
        subprocess.run(["rsvg-convert", "-b", "#1e1e1e", str(svg), "-o", str(png)], check=True)
        return
    try:
        import cairosvg  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("need rsvg-convert (apt-get install librsvg2-bin) or cairosvg "
                         "to turn the SVG into a PNG.") from None
    cairosvg.svg2png(url=str(svg), write_to=str(png), background_color="#1e1e1e")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true",
                        help="attach to the running pdbox instead of the test snapshot")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tui.png")
    parser.add_argument("--size", default="160x48", help="terminal COLSxROWS")
    parser.add_argument("--svg", type=Path, help="also keep the SVG here")
    args = parser.parse_args()
    cols, rows = (int(x) for x in args.size.lower().split("x"))
    if args.live:
        from pdbox.control_client import ControlClient, ControlError

        try:
            source: Any = ControlClient.from_run_folder()
        except ControlError as exc:
            raise SystemExit(str(exc)) from None
        settle = 10.0
    else:
        source = fake_source()
        settle = 5.0
    with tempfile.TemporaryDirectory() as tmp:
        svg = args.svg or Path(tmp) / "tui.svg"
        asyncio.run(render(source, svg, (cols, rows), settle))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        to_png(svg, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
