"""py4j gateways with an auth token, for the JVM-backed envs (TextWorldExpress, ScienceWorld).

Both packages start their simulator the same way: py4j's `launch_gateway(classpath=<their jar>)` runs py4j's own
`py4j.GatewayServer` on 127.0.0.1 (an ephemeral port), and `JavaGateway(GatewayParameters(port=...))` connects to
it. Without a token, ANY local user who finds the port can connect and call `java.lang.Runtime.exec`, i.e. run
commands as the trainer's user. py4j has the cure built in: `launch_gateway(enable_auth=True)` makes the server
generate a random token (printed on the JVM's stdout, which only this process reads) and refuse every connection
that does not present it.

`require_auth(module)` is the ONE place this is done: it replaces, in the package's module (not in py4j),
- `launch_gateway` by a wrapper that always passes `enable_auth=True` and returns what the package's call expects
  (`port` or `(port, proc)`); the token goes to a thread-local,
- `GatewayParameters` / `CallbackServerParameters` by wrappers that add that token.
The package's constructor calls these three in that order in one thread, so concurrent launches in other threads
cannot mix tokens. The Python callback server gets the token too: the packages make no callbacks (Java never calls
Python), so it now refuses everyone instead of accepting any local user. `check_auth(env)` asserts, after a
launch, that the package's gateway really holds a token (it fails loudly if a package update bypasses the wrapper).

Left as the packages have it: their opt-in debug mode (`TWX_DEBUG` / `SCIENCEWORLD_DEBUG`) also opens a JDWP
debugger port (5005, localhost); do not set those on a shared machine.
"""

from __future__ import annotations

import threading
from types import ModuleType

_MARK = "_epo_trl_py4j_auth"
_launch = threading.local()  # .token: the token of the last gateway this thread launched


def require_auth(module: ModuleType) -> None:
    """Make `module` (the package module that imported py4j's names) launch and connect with an auth token.
    Idempotent; patches only `module`'s own references."""
    if getattr(module, _MARK, False):
        return
    from py4j.java_gateway import CallbackServerParameters, GatewayParameters, launch_gateway

    def launch_with_token(*args, **kwargs):
        want_proc = kwargs.pop("return_proc", False)
        kwargs["enable_auth"] = True
        port, token, proc = launch_gateway(*args, return_proc=True, **kwargs)
        _launch.token = token
        return (port, proc) if want_proc else port

    def with_token(cls):
        def make(*args, **kwargs):
            token = getattr(_launch, "token", None)
            if not token:
                raise RuntimeError(
                    f"{module.__name__} connects to a py4j gateway it did not launch through epo_trl's "
                    "authenticated launch_gateway; refusing to connect without a token."
                )
            kwargs["auth_token"] = token
            return cls(*args, **kwargs)

        return make

    module.launch_gateway = launch_with_token
    module.GatewayParameters = with_token(GatewayParameters)
    module.CallbackServerParameters = with_token(CallbackServerParameters)
    setattr(module, _MARK, True)


def check_auth(env) -> None:
    """Raise (after closing `env`) unless the package env's py4j gateway was opened with a token."""
    gateway = getattr(env, "_gateway", None)
    token = getattr(getattr(gateway, "gateway_parameters", None), "auth_token", None)
    if not token:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - the refusal below is the error that matters
            pass
        raise RuntimeError(
            f"{type(env).__module__}.{type(env).__name__} started its JVM gateway without an auth token (a "
            "package update bypassed epo_trl.envs.jvm_gateway.require_auth?): any local user could run "
            "code through it. Refusing to use it."
        )
