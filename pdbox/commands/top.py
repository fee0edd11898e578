"""`pdbox top`: attach the TUI to a running pdbox. Quitting detaches; pdbox keeps running."""

from __future__ import annotations

import click

from pdbox.control_client import ControlClient, ControlError


@click.command(help="Attach the TUI to a running pdbox.")
def top() -> None:
    try:
        client = ControlClient.from_run_folder()
        # Fail now, in one sentence, rather than open a TUI that only shows the error.
        client.sync_status()
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    from pdbox.tui.app import run_tui  # textual loads only once we know there is a pdbox

    run_tui(client, owns_server=False)
