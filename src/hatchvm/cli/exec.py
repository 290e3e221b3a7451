"""`hatchvm exec VM -- CMD ARGS...`: run a command in a VM, its output streamed to this
terminal as it comes, exiting with the command's exit code (like ssh: 255 when hatchvm itself
fails, 128+N when signal N ended the command, 124 after its timeout)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from hatchvm.cli.context import connection
from hatchvm.cli.errors import EXPECTED, one_line
from hatchvm.cli.output import print_error, print_json

FAILED = 255  # hatchvm's own failure, not the command's
TIMED_OUT = 124  # as timeout(1) says it


def exit_status(event: dict[str, Any]) -> int:
    if event.get("timed_out"):
        return TIMED_OUT
    if event.get("signal") is not None:
        return 128 + int(event["signal"])
    return int(event.get("exit_code") or 0)


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=value", param_hint="--env")
        env[name] = value
    return env


def exec_command(
    ctx: typer.Context,
    vm_id: Annotated[str, typer.Argument(help="The VM's id (vm_...).", show_default=False)],
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="NAME=value (repeatable).")
    ] = None,
    cwd: Annotated[
        str | None, typer.Option("--cwd", "-w", help="Directory to run in (default /root).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds before the command is killed (default 60).")
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", "-i", help="Send this stdin (read to its end, <= 1 MiB).")
    ] = False,
    shell: Annotated[
        bool, typer.Option("--shell", "-c", help="Run the words as one /bin/sh -c string.")
    ] = False,
    background: Annotated[
        bool, typer.Option("--background", "-d", help="Start it in the background; print it.")
    ] = False,
) -> None:
    """Run a command in a VM (woken first if it sleeps): hatchvm exec VM -- ls -la /"""
    cmd: list[str] | str = " ".join(command) if shell else command
    try:
        data = sys.stdin.read() if stdin else None
        with connection(ctx).client() as api:
            if background:
                print_json(
                    api.exec(
                        vm_id, cmd, env=_env(env or []), cwd=cwd, timeout_s=timeout, background=True
                    )
                )
                raise typer.Exit(0)
            status = _stream(api, vm_id, cmd, _env(env or []), cwd, data, timeout)
    except EXPECTED as exc:
        print_error(one_line(exc))
        raise typer.Exit(FAILED) from None
    except KeyboardInterrupt:
        print_error("interrupted")
        raise typer.Exit(130) from None
    raise typer.Exit(status)


def _stream(
    api: Any,
    vm_id: str,
    cmd: list[str] | str,
    env: dict[str, str],
    cwd: str | None,
    stdin: str | None,
    timeout: float | None,
) -> int:
    for event in api.exec_stream(vm_id, cmd, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout):
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            stream = sys.stdout if kind == "stdout" else sys.stderr
            stream.write(event.get("data") or "")
            stream.flush()
        elif kind == "exit":
            if event.get("timed_out"):
                print_error(f"the command timed out after {timeout or 60:g} s (--timeout)")
            return exit_status(event)
        elif kind == "error":
            print_error(str(event.get("error")))
            return FAILED
    print_error("the stream ended without the command's exit")
    return FAILED
