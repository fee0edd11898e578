"""`pdbox chat`: talk to the running pdbox, or to any OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from pdbox import runfolder
from pdbox.chat import (
    DEFAULT_TIMEOUT_S,
    ChatError,
    Conversation,
    Repl,
    list_models,
    normalize_base_url,
    stream_chat,
)


def resolve_url(url: str | None) -> str:
    if url:
        return normalize_base_url(url)
    try:
        return normalize_base_url(runfolder.read().endpoint)
    except runfolder.NotRunning as exc:
        raise click.ClickException(str(exc)) from None


def resolve_model(base_url: str, model: str | None, api_key: str | None) -> str:
    if model:
        return model
    try:
        models = asyncio.run(list_models(base_url, api_key=api_key))
    except ChatError as exc:
        raise click.ClickException(str(exc)) from None
    if not models:
        raise click.ClickException(f"{base_url}/models lists no model; pass --model NAME.")
    return models[0]


@click.command(help="Chat with the running pdbox (or any OpenAI server) in a REPL.")
@click.option("--url", help="OpenAI base URL (default: the running pdbox's endpoint).")
@click.option("--model", help="Model name (default: the first of /v1/models).")
@click.option("--message", "-m", help="Send one message, print the answer and exit.")
@click.option("--json", "as_json", is_flag=True,
              help="With --message: print the answer and its figures as JSON.")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Cap on tokens per answer.")
@click.option("--temperature", type=click.FloatRange(min=0.0), help="Sampling temperature.")
@click.option("--api-key", envvar="PDBOX_API_KEY", help="API key, if the endpoint needs one.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1.0), default=DEFAULT_TIMEOUT_S,
              show_default=True, help="Seconds to wait for the next piece of an answer.")
def chat(url: str | None, model: str | None, message: str | None, as_json: bool,
         system: str | None, max_tokens: int | None, temperature: float | None,
         api_key: str | None, timeout_s: float) -> None:
    if as_json and message is None:
        raise click.UsageError("--json needs --message.")
    base_url = resolve_url(url)
    model = resolve_model(base_url, model, api_key)
    if message is None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        Repl(base_url, model, api_key=api_key, system=system, max_tokens=max_tokens,
             temperature=temperature, timeout_s=timeout_s).run()
        return

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    coro = stream_chat(base_url, model, Conversation(system=system).messages(message),
                       on_delta=None if as_json else echo, api_key=api_key,
                       max_tokens=max_tokens, temperature=temperature, timeout_s=timeout_s)
    try:
        turn = asyncio.run(coro)
    except ChatError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    if as_json:
        click.echo(json.dumps(turn.as_json()))
    else:
        click.echo()
