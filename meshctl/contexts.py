"""`meshctl config …`: named contexts (which mesh, with which key), kubectl-style, so meshctl
works from any directory; resolution order in `meshctl.config`."""

from __future__ import annotations

import pathlib

import typer

from meshctl import config
from meshctl.output import OUTPUT, Column, OutputFormat, emit

config_app = typer.Typer(help="Named contexts: which mesh meshctl talks to, with which key.",
                         no_args_is_help=True)


@config_app.command("set-context")
def set_context(
    name: str = typer.Argument(..., help="The context's name."),
    gateway: str = typer.Option(None, "--gateway", help="host:port"),
    registry: str = typer.Option(None, "--registry", help="host:port"),
    scheduler: str = typer.Option(None, "--scheduler", help="host:port"),
    auditor: str = typer.Option(None, "--auditor", help="host:port"),
    prometheus: str = typer.Option(None, "--prometheus", help="host:port"),
    etcd: str = typer.Option(None, "--etcd", help="host:port"),
    triton: str = typer.Option(None, "--triton", help="host:port"),
    triton_metrics: str = typer.Option(None, "--triton-metrics", help="host:port"),
    api_key_file: pathlib.Path = typer.Option(
        None, "--api-key-file", help="A file holding the API key (the key is never copied)."),
    tls_ca_file: pathlib.Path = typer.Option(
        None, "--tls-ca-file", help="PEM CA that verifies the mesh's servers (default: the "
        "stack's, with --state-dir; else the system's roots)."),
    tls_cert_file: pathlib.Path = typer.Option(
        None, "--tls-cert-file", help="The operator's certificate, which internal services "
        "(registry, scheduler, auditor, etcd) ask for."),
    tls_key_file: pathlib.Path = typer.Option(None, "--tls-key-file",
                                              help="The key of --tls-cert-file."),
    state_dir: pathlib.Path = typer.Option(
        None, "--state-dir", help="An embedded stack's state directory: what the context does "
        "not name comes from its stack.json."),
    use: bool = typer.Option(False, "--use", help="Also make it the current context."),
) -> None:
    """Create a context, or change the fields given (the others stay)."""
    loaded = config.MeshConfig.load()
    context = loaded.contexts.setdefault(name, {})
    given = {"gateway": gateway, "registry": registry, "scheduler": scheduler,
             "auditor": auditor, "prometheus": prometheus, "etcd": etcd, "triton": triton,
             "triton-metrics": triton_metrics,
             "api-key-file": str(api_key_file.expanduser().resolve()) if api_key_file else None,
             **{field: str(path.expanduser().resolve()) if path else None
                for field, path in zip(config.TLS_FIELDS,
                                       (tls_ca_file, tls_cert_file, tls_key_file), strict=True)},
             "state-dir": str(state_dir.expanduser().resolve()) if state_dir else None}
    context.update({k: v for k, v in given.items() if v is not None})
    if use or not loaded.current_context:
        loaded.current_context = name
    path = loaded.save()
    typer.echo(f"context {name} saved in {path}"
               + ("; it is the current context" if loaded.current_context == name else ""),
               err=True)


@config_app.command("use-context")
def use_context(name: str = typer.Argument(..., help="A context from get-contexts.")) -> None:
    """Make NAME the current context."""
    loaded = config.MeshConfig.load()
    if name not in loaded.contexts:
        typer.echo(f"error: NOT_FOUND: no context {name!r} in {config.config_path()}", err=True)
        raise typer.Exit(5)
    loaded.current_context = name
    loaded.save()
    typer.echo(f"switched to context {name}", err=True)


@config_app.command("current-context")
def current_context() -> None:
    """Print the context in force (`--context`, INFERMESH_CONTEXT, or the current one)."""
    active = config.MeshConfig.load().active()
    if active is None:
        typer.echo("error: NOT_FOUND: no current context", err=True)
        raise typer.Exit(5)
    typer.echo(active[0])


@config_app.command("delete-context")
def delete_context(name: str) -> None:
    """Remove a context (the current one too: then none is current)."""
    loaded = config.MeshConfig.load()
    if loaded.contexts.pop(name, None) is None:
        typer.echo(f"error: NOT_FOUND: no context {name!r}", err=True)
        raise typer.Exit(5)
    if loaded.current_context == name:
        loaded.current_context = ""
    loaded.save()
    typer.echo(f"deleted context {name}", err=True)


@config_app.command("get-contexts")
def get_contexts(output: OutputFormat = OUTPUT) -> None:
    """Every context; `*` marks the one in force."""
    loaded = config.MeshConfig.load()
    active = loaded.active()
    rows = [{"name": name, "current": active is not None and active[0] == name, **fields}
            for name, fields in sorted(loaded.contexts.items())]
    emit(output, rows, [
        Column("CURRENT", lambda r: "*" if r["current"] else ""),
        Column("NAME", lambda r: r["name"]),
        Column("GATEWAY", lambda r: r.get("gateway")),
        Column("REGISTRY", lambda r: r.get("registry")),
        Column("STATE-DIR", lambda r: r.get("state-dir")),
        Column("API-KEY-FILE", lambda r: r.get("api-key-file"), wide=True),
        Column("SCHEDULER", lambda r: r.get("scheduler"), wide=True),
        Column("AUDITOR", lambda r: r.get("auditor"), wide=True),
        Column("PROMETHEUS", lambda r: r.get("prometheus"), wide=True),
    ])
