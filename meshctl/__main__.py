"""meshctl: the one admin CLI. Subcommands stay thin: parse, call a library, print."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sys
import time

import typer
from infermesh_client import InfermeshError

from meshctl import config
from meshctl.audit import audit_app
from meshctl.capacity import capacity_app
from meshctl.client import client_options, resolved_options
from meshctl.config import DEFAULT_STATE_DIR
from meshctl.contexts import config_app
from meshctl.engine import engine_app
from meshctl.exits import ExitCode, describe, exit_code, fail_error
from meshctl.generate import print_final, sampling, stream_generation, unary_generation
from meshctl.progress import spinner
from meshctl.registry import registry_app
from meshctl.replicas import replicas as replicas_command
from meshctl.slo import slo as slo_command
from meshctl.stack_status import stack_status
from meshctl.tenants import key_app, tenant_app
from meshctl.trace import trace as trace_command

# An unexpected traceback never prints locals: they hold API keys and the mesh token.
app = typer.Typer(help="Operate infermesh: the local stack, generations, the audit log.\n\n"
                  "Endpoints and the API key come from flags, then INFERMESH_* variables, then "
                  "the current context (`meshctl config`), then the embedded stack in "
                  "./.infermesh. Reads take -o table|wide|json|yaml. Exit codes: 0 ok, 1 error, "
                  "2 usage, 3 invalid, 4 auth, 5 not found, 6 conflict, 7 refused, "
                  "8 unavailable.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
stack_app = typer.Typer(help="Start and stop the embedded stack.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
stack_app.command("status")(stack_status)
app.add_typer(engine_app, name="engine")
app.add_typer(audit_app, name="audit")
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.command("slo")(slo_command)
app.command("replicas")(replicas_command)
app.command("trace")(trace_command)
app.add_typer(registry_app, name="registry")
app.add_typer(capacity_app, name="capacity")
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"meshctl {version('infermesh')}")
        except PackageNotFoundError:
            typer.echo("meshctl (not installed)")
        raise typer.Exit


@app.callback()
def _global(
    context: str = typer.Option(None, "--context", envvar="INFERMESH_CONTEXT",
                                help="Use this context of the config file for this command."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print meshctl's version and exit."),
) -> None:
    """Global options: the context, the version."""
    config.selected_context = context

@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: str = typer.Option(..., "--model", envvar="INFERMESH_MODEL",
                              help="name, name@alias or name@sha256:<hex>"),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they arrive."),
    chat: bool = typer.Option(False, "--chat", help="Send the text as a user chat message "
                              "(rendered with the model's chat template)."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(None, "--temperature"),
    seed: int = typer.Option(None, "--seed"),
    cancel_after: int = typer.Option(None, "--cancel-after",
                                     help="Send Cancel after this many token frames."),
    gateway: str = typer.Option(None, "--gateway", help="host:port [env INFERMESH_GATEWAY]"),
    api_key: str = typer.Option(None, "--api-key", help="[env INFERMESH_API_KEY]"),
) -> None:
    """Generate text; on an error print `error: CODE: message` (and when to retry, if the mesh
    said) and exit with the code's exit status (4 auth, 7 refused …)."""
    options = resolved_options("gateway", gateway, api_key, timeout_s=None)
    params = sampling(max_tokens, temperature, seed)
    if stream or cancel_after is not None:
        result = asyncio.run(
            stream_generation(options, model, prompt, params, cancel_after, chat=chat))
        if result.generation is not None:
            print_final(result.generation)
        if result.error is not None:
            error = result.error
            typer.echo(("" if result.generation else "\n") + "error: "
                       + describe(error.code, error.message, error.retry_after), err=True)
            raise typer.Exit(exit_code(error.code))
        return
    try:
        generation = asyncio.run(unary_generation(options, model, prompt, params, chat=chat))
    except InfermeshError as exc:
        fail_error(exc)
    typer.echo(generation.text, nl=False)
    print_final(generation)


@stack_app.command("up")
def stack_up(
    detach: bool = typer.Option(False, "--detach", help="Start in the background and return."),
    demo: bool = typer.Option(False, "--demo", help="Stream a demo generation once it is up."),
    state_dir: pathlib.Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir"),
    traces: pathlib.Path = typer.Option(
        None, "--traces", help="Run a trace receiver that writes every service's spans to "
        "DIR as OTLP JSON lines (read them with `meshctl trace REQUEST_ID`)."),
) -> None:
    """Start etcd, Triton, the sidecar and every service; write <state-dir>/env."""
    from deploy.local.stack import Stack, StackOptions
    from deploy.local.state import load_state

    if load_state(state_dir) is not None:
        typer.echo(f"a stack is already recorded in {state_dir}/stack.json; "
                   "run `meshctl stack down` first", err=True)
        raise typer.Exit(ExitCode.CONFLICT)
    if detach:  # this same command in the foreground, in the background: it supervises
        _up_in_background(state_dir, demo, traces)
        return
    stack = Stack(StackOptions(state_dir=state_dir,
                               traces_dir=traces.resolve() if traces is not None else None))
    started = time.monotonic()
    with spinner("starting etcd, Triton (torch and reference engines), sidecar and services"):
        info = stack.up()
    typer.echo(f"stack up in {time.monotonic() - started:.1f}s; gateway {info.gateway}; "
               f"env in {state_dir / 'env'}; logs in {state_dir / 'logs'}", err=True)
    _how_to_use(state_dir)
    if demo:
        question = "What is the capital of France? Answer in two sentences."
        typer.echo(f"\n$ meshctl generate --stream --chat --model {info.model} '{question}'\n",
                   err=True)
        options = client_options("gateway", info.gateway, info.api_key, info.client_tls(),
                                 timeout_s=None)
        result = asyncio.run(stream_generation(options, info.model, question,
                                               sampling(64, None, None), chat=True))
        if result.generation is not None:
            print_final(result.generation)
    typer.echo("\nserving; a process that dies is restarted (`meshctl stack status`); "
               "Ctrl-C stops every process.", err=True)
    stopping = False

    def request_stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stopping:
            time.sleep(0.5)
    finally:
        typer.echo("stopping ...", err=True)
        stack.down()
        typer.echo("stopped.", err=True)


def _up_in_background(state_dir: pathlib.Path, demo: bool, traces: pathlib.Path | None) -> None:
    """Starts `meshctl stack up` as a detached process (its output in logs/stack.log) and
    returns once its stack.json is written, or fails with the log's tail if it exits first."""
    import subprocess

    from deploy.local.state import load_state

    log_path = state_dir / "logs" / "stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "meshctl", "stack", "up", "--state-dir", str(state_dir)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen([*argv, *(["--demo"] if demo else []),
                                    *(["--traces", str(traces.resolve())] if traces else [])],
                                   stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    deadline = time.monotonic() + 300.0
    with spinner("starting the stack in the background"):
        while load_state(state_dir) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                typer.echo(f"the stack did not come up:\n{tail}", err=True)
                raise typer.Exit(1)
            time.sleep(0.5)
    info = load_state(state_dir)
    assert info is not None
    typer.echo(f"stack up (supervised by pid {process.pid}); gateway {info.gateway}; env in "
               f"{state_dir / 'env'}; logs in {state_dir / 'logs'}", err=True)
    _how_to_use(state_dir)


def _how_to_use(state_dir: pathlib.Path) -> None:
    absolute = state_dir.resolve()
    typer.echo(f"use it from this directory as is, from a shell with `. {absolute / 'env'}`, "
               f"or from anywhere with `meshctl config set-context local --state-dir "
               f"{absolute} --use`", err=True)


@stack_app.command("down")
def stack_down(state_dir: pathlib.Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir")) -> None:
    """Stop a stack started with `stack up --detach`."""
    from deploy.local.stack import stop_detached

    stopped = stop_detached(state_dir)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "no stack was running", err=True)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
