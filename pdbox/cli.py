"""The `pdbox` command. `up` is the only long-running command; the others talk
to a running pdbox through its control API, or work offline."""

from __future__ import annotations

import importlib

import click

from pdbox import __version__

# name -> "module:attribute". Imported lazily so `pdbox --help` stays fast and
# offline commands never pay for the router or the TUI.
COMMANDS: dict[str, str] = {
    "up": "pdbox.commands.up:up",
    "status": "pdbox.commands.status:status",
    "down": "pdbox.commands.status:down",
    "scale": "pdbox.commands.status:scale",
    "policy": "pdbox.commands.status:policy",
    "profiles": "pdbox.commands.profiles:profiles",
    "plan": "pdbox.commands.plan:plan",
    "doctor": "pdbox.commands.doctor:doctor",
    "model": "pdbox.commands.model:model",
    "replay": "pdbox.commands.replay:replay",
    "export": "pdbox.commands.export:export",
    "top": "pdbox.commands.top:top",
    "chat": "pdbox.commands.chat:chat",
    "smoke": "pdbox.commands.smoke:smoke",
    "bench": "pdbox.bench.cli:bench",
}

HELP = {
    "up": "Start the workers, the router and the TUI (or --headless).",
    "status": "Show the running pdbox's workers and figures.",
    "down": "Stop the running pdbox and every worker it started.",
    "scale": "Pin a role's replica count, or give it back to the autoscaler.",
    "policy": "Show or set the router's routing policy.",
    "profiles": "List, show and validate profiles.",
    "plan": "Show what `up` would start: argv, env and memory per worker.",
    "doctor": "Check this machine for what pdbox needs.",
    "model": "Prepare or inspect the embedded model cache.",
    "replay": "Replay a public trace through the routing policy or the autoscaler.",
    "export": "Export a profile to a cluster engine (llm-d on Kubernetes).",
    "top": "Attach the TUI to a running pdbox.",
    "chat": "Chat with the running pdbox (or any OpenAI server) in a REPL.",
    "smoke": "Run end-to-end checks against a running pdbox.",
    "bench": "Compare setups on this machine with the same workload (trace, phases, ...).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            reason = str(exc)

            # A command whose module is missing shows up but says why it can't run.
            @click.command(name=name, help=HELP.get(name, ""))
            def unavailable() -> None:
                raise click.ClickException(f"'pdbox {name}' is not available: {reason}")

            return unavailable

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, HELP.get(n, "")) for n in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pdbox")
def main() -> None:
    """pdbox: prefill/decode-disaggregated vLLM serving on one machine.

    One `pdbox up` starts prefill and decode vLLM workers linked by NIXL, a
    prefix-cache-aware router with one OpenAI endpoint, a local autoscaler and
    a live TUI.
    """


if __name__ == "__main__":
    main()
