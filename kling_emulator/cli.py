"""`kling-emulator serve`: a local Kling API on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kling_emulator.faults import load_profile
from kling_emulator.files import check_pad
from kling_emulator.server import THIRTY_DAYS, EmulatorConfig, serve_forever

app = typer.Typer(help="A local Kling API server that renders real MP4s.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """kling-emulator"""


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    provider: Annotated[str, typer.Option(help="kling (JWT) or cometapi (bearer, /kling prefix)")] = "kling",
    access_key: str = "emulator-ak",
    secret_key: str = "emulator-secret-key-0123456789abcdef",
    api_key: Annotated[str, typer.Option(help="CometAPI bearer key")] = "emulator-key",
    time_scale: Annotated[float, typer.Option(help="1.0 = Kling's typical latencies")] = 1.0,
    concurrency: Annotated[int, typer.Option(help="account concurrency; over it -> 429/1303")] = 5,
    faults: Annotated[Path | None, typer.Option(help="fault profile (YAML or JSON)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="keep tasks and files across restarts")] = None,
    result_ttl: Annotated[float, typer.Option(help="seconds before result URLs expire")] = THIRTY_DAYS,
    resolution: Annotated[str, typer.Option(help="small (fast) or 720p")] = "small",
    pad_bytes: Annotated[int, typer.Option(help="append an MP4 `free` box of this many bytes to served files")] = 0,
    lookup_query: Annotated[str, typer.Option(
        help="?external_task_id=X: filter (answers that task), ignored (the plain list), empty (data [])")] = "filter",
    lookup_path: Annotated[str, typer.Option(help="/{id} by external_task_id: on, or off (404/1203)")] = "on",
    unique_external_ids: Annotated[bool, typer.Option(
        help="refuse a reused external_task_id (400/1201); --no-unique-external-ids accepts it")] = True,
    queued_status_word: Annotated[str | None, typer.Option(
        help="report `submitted` tasks with this word instead, e.g. queueing")] = None,
) -> None:
    """Serve the emulated Kling API until interrupted."""
    if provider not in ("kling", "cometapi"):
        raise typer.BadParameter("provider must be kling or cometapi")
    if resolution not in ("small", "720p"):
        raise typer.BadParameter("resolution must be small or 720p")
    config = EmulatorConfig(
        provider=provider, access_key=access_key, secret_key=secret_key, api_key=api_key, time_scale=time_scale,
        concurrency=concurrency, faults=load_profile(faults) if faults else None, state_dir=state_dir,
        result_ttl_seconds=result_ttl, resolution=resolution, host=host, port=port, pad_bytes=pad_bytes,
        lookup_query=lookup_query, lookup_path=lookup_path, unique_external_ids=unique_external_ids,
        queued_status_word=queued_status_word,
    )
    try:  # a wrong switch or profile is a usage error, not a traceback
        config.behaviour()
        check_pad(pad_bytes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    serve_forever(config)


def main() -> None:
    app()
