"""`epo-trl serve-env ENV`: serve an environment over OpenEnv's protocol for rollouts on other machines.

    epo-trl serve-env maze --env_kwargs '{size: 4, task: trail}' --port 8001 --max_sessions 16

ENV is a registered name (`epo_trl.envs.ENV_REGISTRY`: maze, alfworld, scienceworld, textworld_express) or a
factory of your own as `package.module:FactoryClass`. Each session (one WebSocket connection) gets its own env; point
rollouts at the server with `--env_server_urls '[http://HOST:8001]'` (docs/environments.md, "Environments on other
machines").
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UsageError, require_module, user_errors
from .parser import yaml_mapping_for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epo-trl serve-env", description=__doc__.split("\n\n")[0])
    p.add_argument("env", help="A registered env name, or module:FactoryClass for your own EnvFactory.")
    p.add_argument(
        "--env_kwargs", type=yaml_mapping_for("env_kwargs"), default={}, help="Factory options (YAML/JSON)."
    )
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0: every interface).")
    p.add_argument("--port", type=int, default=8000, help="TCP port.")
    p.add_argument("--max_sessions", type=int, default=8, help="Concurrent sessions (live envs) this server holds.")
    p.add_argument(
        "--env_workers",
        default="auto",
        choices=("auto", "threads", "processes"),
        help="Where each session's env runs: a thread of the server, or a worker process of its own ('auto' = the "
        "factory's thread_safe).",
    )
    p.add_argument(
        "--step_timeout_s", type=float, default=60.0, help="An env call running longer fails its session's episode."
    )
    p.add_argument("--log_level", default="warning", help="uvicorn's log level.")
    return p


def make_any_factory(spec: str, kwargs: dict):
    """A registered env by name, or `module:Class` imported and built with `kwargs`."""
    from ..envs import ENV_REGISTRY, make_factory
    from ..envs.protocol import EnvFactory

    if ":" not in spec:
        if spec not in ENV_REGISTRY:
            raise UsageError(
                f"env={spec!r} is not a registered environment.",
                f"fix: use one of {', '.join(sorted(ENV_REGISTRY))}, or module:FactoryClass for your own.",
            )
        return make_factory(spec, **kwargs)
    module_name, cls_name = spec.split(":", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    factory = cls(**kwargs)
    if not isinstance(factory, EnvFactory):
        raise TypeError(f"{spec} built a {type(factory).__name__}, not an epo_trl EnvFactory")
    return factory


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its message (or --help)
        return int(e.code or 0)
    require_module("openenv", "serve-env", 'pip install "epo-trl[openenv]"')
    if args.max_sessions < 1 or not 0 < args.port < 65536 or args.step_timeout_s <= 0:
        raise UsageError("--max_sessions must be >= 1, --port in 1..65535 and --step_timeout_s > 0.")
    with user_errors(f"env {args.env!r}"):
        factory = make_any_factory(args.env, args.env_kwargs)
    if os.environ.get("ENABLE_WEB_INTERFACE", "").lower() not in ("1", "true", "yes"):
        # OpenEnv's web UI is off: block its gradio import (most of the server's start-up time). openenv.core treats
        # a gradio that is not installed as "no web UI" (env_server/__init__.py catches the ModuleNotFoundError).
        sys.modules.setdefault("gradio", None)
    from ..envs.openenv_server import serve

    print(
        f"epo-trl serve-env: {factory.name} on http://{args.host}:{args.port} (WebSocket /ws), "
        f"{args.max_sessions} sessions, env_workers {args.env_workers}",
        flush=True,
    )
    serve(factory, args.host, args.port, args.max_sessions, args.env_workers, args.step_timeout_s, args.log_level)
    return 0
