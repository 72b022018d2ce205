"""Security properties (issue 34): the envs' JVM gateways refuse clients without their token, the colocated vLLM's
rendezvous stays on loopback, and the env workers' pickle transport is documented as process-tree only.
(The Slurm script's vLLM host is tested in tests/test_slurm.py.)"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the JVM envs need a Java runtime")


# -- 1. the JVM envs' py4j gateways -----------------------------------------------------------------------------


def assert_gateway_refuses_strangers(gateway) -> None:
    """`gateway` is the package env's live `JavaGateway`: a client without (or with a wrong) token is refused by the
    Java server, one with the token is served; the Python callback server refuses unauthenticated commands."""
    from py4j.java_gateway import GatewayParameters, JavaGateway
    from py4j.protocol import Py4JError

    port, token = gateway.gateway_parameters.port, gateway.gateway_parameters.auth_token
    assert token and gateway.gateway_parameters.address == "127.0.0.1"
    for stranger in (GatewayParameters(port=port), GatewayParameters(port=port, auth_token="not-the-token")):
        client = JavaGateway(gateway_parameters=stranger)
        try:
            with pytest.raises(Py4JError):  # reaching System is reaching Runtime.exec: it must not be possible
                client.jvm.java.lang.System.getProperty("user.name")
        finally:
            client.close()
    friend = JavaGateway(gateway_parameters=GatewayParameters(port=port, auth_token=token))
    try:  # the control: the same client with the token gets in, so the refusals above are the token's doing
        assert friend.jvm.java.lang.System.getProperty("user.name")
    finally:
        friend.close()
    # The Python callback server (Java -> Python; the packages make no callbacks) takes the token too: an
    # unauthenticated "garbage-collect proxy" command gets no "!yv" success, only a closed connection.
    callback_port = gateway.get_callback_server().get_listening_port()
    with socket.create_connection(("127.0.0.1", callback_port), timeout=10) as sock:
        sock.sendall(b"g\nsome-proxy\ne\n")
        try:
            reply = sock.recv(64)
        except ConnectionResetError:  # closed with our command unread
            reply = b""
        assert reply == b""


@needs_java
def test_textworld_express_gateway_needs_its_token():
    pytest.importorskip("textworld_express")
    from epo_trl.envs.textworld_express import TextWorldExpressFactory

    factory = TextWorldExpressFactory(game="coin", game_params="numLocations=5,includeDoors=0", num_train=1)
    task = factory.tasks()[0]
    env = factory.make()
    try:
        env.reset(task)
        assert_gateway_refuses_strangers(env._twx._gateway)
        obs, _, _, _ = env.step(env.project_action("look around"))  # the env itself still plays
        assert obs
    finally:
        env.close()


@needs_java
def test_scienceworld_gateway_needs_its_token():
    pytest.importorskip("scienceworld")
    from epo_trl.envs import TaskSpec
    from epo_trl.envs.scienceworld import ScienceWorldFactory

    env = ScienceWorldFactory(task_names=["find-plant"], held_out_tasks=()).make()
    try:
        env.reset(TaskSpec(env="scienceworld", task="find-plant", variation=0))
        assert_gateway_refuses_strangers(env.simulator._gateway)
        obs, _, _, _ = env.step("look around")
        assert obs and "No known action" not in obs
    finally:
        env.close()


def test_an_unauthenticated_package_gateway_is_refused():
    """If a package update stops going through the wrapped launch, the adapters refuse the env (and close it)."""
    from epo_trl.envs.jvm_gateway import check_auth, require_auth

    class Params:
        auth_token = None

    class Gateway:
        gateway_parameters = Params()

    class PackageEnv:
        _gateway, closed = Gateway(), False

        def close(self):
            self.closed = True

    env = PackageEnv()
    with pytest.raises(RuntimeError, match="without an auth token"):
        check_auth(env)
    assert env.closed
    # A module whose GatewayParameters is built without a launch through the wrapper refuses to connect.
    import types

    pytest.importorskip("py4j")
    module = types.ModuleType("fake_package")
    require_auth(module)
    import threading

    errors = []
    thread = threading.Thread(target=lambda: errors.append(_raises(module.GatewayParameters, port=1)))
    thread.start()
    thread.join()
    assert errors == ["RuntimeError"]


def _raises(fn, **kwargs) -> str | None:
    try:
        fn(**kwargs)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    return None
