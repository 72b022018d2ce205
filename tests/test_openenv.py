"""Environments on other machines through OpenEnv: `epo-trl serve-env` servers (real uvicorn processes on 127.0.0.1)
played by `RemoteEnvPool` (env_server_urls), by OpenEnv's own client, and by TRL's `environment_factory`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings

import pytest

pytest.importorskip("openenv")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from envs_for_tests import (  # noqa: E402
    WORDS,
    ScriptedFactory,
    admissible_picker,
    always_go,
    maze_tokenizer,
    replay_tool_calls,
    task,
)

from epo_trl.envs.maze import MazeFactory  # noqa: E402
from epo_trl.models.tiny import build_tokenizer  # noqa: E402
from epo_trl.rollout import RolloutConfig, RolloutEngine, run_episodes  # noqa: E402
from epo_trl.rollout.engine import rollout_metrics  # noqa: E402

MAZE_KWARGS = {"size": 3, "task": "trail"}
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(env: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "epo_trl", "serve-env", env, "--port", str(port), *flags]
    # its own process group: stopping it also stops its forkserver and the env workers it started
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _wait(proc: subprocess.Popen, url: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-env exited ({proc.returncode}): {proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"serve-env at {url} did not come up in {limit_s}s")


def _stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group (workers of a server that exited)
    except ProcessLookupError:
        pass
    proc.stdout.close()


@pytest.fixture(scope="session")
def servers():
    """Two maze servers (8 sessions each), a scripted-faults server whose sessions' envs run in worker processes (a
    crashing env kills its worker, not the server) and a scripted server holding 2 sessions: started once, together."""
    maze = json.dumps(MAZE_KWARGS)
    scripted = "envs_for_tests:ScriptedFactory"
    started = [
        _start("maze", "--env_kwargs", maze, "--max_sessions", "8"),
        _start("maze", "--env_kwargs", maze, "--max_sessions", "8"),
        _start(scripted, "--env_workers", "processes", "--max_sessions", "16", "--step_timeout_s", "5"),
        _start(scripted, "--max_sessions", "2"),
    ]
    try:
        for proc, url in started:
            _wait(proc, url)
        yield {"maze": [started[0][1], started[1][1]], "scripted": started[2][1], "small": started[3][1]}
    finally:
        for proc, _ in started:
            _stop(proc)


@pytest.fixture(scope="module")
def tokenizer():
    return maze_tokenizer()


# --- same episodes, local and remote -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_remote_maze_episodes_equal_local_ones(servers, tokenizer, mode):
    """16 concurrent sessions over 2 servers: the episode records equal a local process pool's, turn by turn, and
    the sessions are balanced 8/8."""
    factory = MazeFactory(**MAZE_KWARGS)
    tasks = factory.tasks("valid_seen")[:8] * 2
    local = RolloutConfig(max_turns=8, max_turn_tokens=16, num_workers=2, env_workers="processes")
    expected = run_episodes(admissible_picker(tokenizer), factory, tasks, tokenizer, local, mode)
    remote = RolloutConfig(max_turns=8, max_turn_tokens=16, num_workers=8, env_server_urls=servers["maze"])
    engine = RolloutEngine(factory, tokenizer, remote)
    try:
        records = run_episodes(admissible_picker(tokenizer), factory, tasks, tokenizer, remote, mode, engine=engine)
        assert [s.sessions for s in engine.pool.servers] == [8, 8]
        again = run_episodes(admissible_picker(tokenizer), factory, tasks, tokenizer, remote, mode, engine=engine)
        assert [s.sessions for s in engine.pool.servers] == [8, 8]  # the sessions were reused, not reopened
    finally:
        engine.close()
    assert records == expected == again
    assert not any(r["failed"] for r in records) and any(r["won"] for r in records)
    assert sum(len(r["turns"]) for r in records) > 2 * len(tasks)  # the policy really walks around


def test_remote_textworld_express_episodes_equal_local_ones(tmp_path):
    """A JVM env: Coin Collector served (each session's env in a worker process with its own JVM) plays the same
    episodes as a local process pool."""
    import shutil

    pytest.importorskip("textworld_express")
    if shutil.which("java") is None:
        pytest.skip("TextWorldExpress needs Java")
    from epo_trl.envs import make_factory
    from epo_trl.models.tiny import env_words

    kwargs = {"game": "coin", "game_params": "numLocations=11,includeDoors=1", "num_train": 2, "num_valid": 2}
    factory = make_factory("textworld_express", **kwargs)
    tokenizer = build_tokenizer([*WORDS, *env_words(factory)])
    tasks = factory.tasks("valid_seen")[:1]  # one JVM on each side: a JVM's start is most of this test's time
    proc, url = _start("textworld_express", "--env_kwargs", json.dumps(kwargs), "--max_sessions", "1")
    try:
        local = RolloutConfig(max_turns=5, max_turn_tokens=24, num_workers=1, env_workers="processes")
        expected = run_episodes(admissible_picker(tokenizer), factory, tasks, tokenizer, local)
        _wait(proc, url)
        remote = RolloutConfig(max_turns=5, max_turn_tokens=24, num_workers=1, env_server_urls=[url])
        records = run_episodes(admissible_picker(tokenizer), factory, tasks, tokenizer, remote)
    finally:
        _stop(proc)
    assert records == expected and not any(r["failed"] for r in records)
    assert len(records[0]["turns"]) > 1  # it really played


def picker(factory, tokenizer):
    """`epo-trl eval --policy test_openenv:picker`: the deterministic admissible-action policy."""
    return admissible_picker(tokenizer)


def test_epo_trl_eval_on_served_envs_equals_local(servers, tmp_path):
    from epo_trl.cli import main
    from epo_trl.models.tiny import build_tiny_model, env_words

    model = build_tiny_model(str(tmp_path / "model"), env_words(MazeFactory(**MAZE_KWARGS)))
    out = {}
    for name, extra in (("local", []), ("remote", ["--env_server_urls", json.dumps(servers["maze"])])):
        path = tmp_path / f"{name}.json"
        argv = ["eval", "--model", model, "--policy", "test_openenv:picker", "--env", "maze", "--env_kwargs",
                json.dumps(MAZE_KWARGS), "--limit", "6", "--k", "2", "--max_turns", "6", "--output", str(path)]  # fmt: skip
        assert main(argv + extra) == 0
        out[name] = json.loads(path.read_text())
    assert out["remote"]["episodes"] == out["local"]["episodes"] and len(out["local"]["episodes"]) == 12
    assert out["remote"]["summary"] == out["local"]["summary"]
    assert not any(r["failed"] for r in out["remote"]["episodes"])
    assert sum(len(r["turns"]) for r in out["remote"]["episodes"]) > 12


# --- faults --------------------------------------------------------------------------------------------------------
FAULTS = [
    task("count", 2, 0),
    task("raise", 2, 1),
    task("hang_forever", 2, 2),
    task("count", 3, 3),
    task("die", 2, 4),
    task("bad_won", 1, 5),
    task("project_raise", 1, 6),
    task("count", 1, 7),
    task("reset_raise", 1, 8),
    task("old_shape", 1, 9),
]


def test_env_faults_on_a_server_fail_their_episodes_as_locally(servers, tokenizer):
    """Raising, hung, crashing and garbage-returning envs on a server: the same episodes fail as in a local process
    pool, counted the same way (rollout/env_failures); the others win; the server stays in use."""
    factory = ScriptedFactory()
    local = RolloutConfig(max_turns=6, step_timeout_s=2.0, num_workers=2, env_workers="processes")
    remote = RolloutConfig(max_turns=6, step_timeout_s=2.0, num_workers=8, env_server_urls=[servers["scripted"]])
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, config in (("local", local), ("remote", remote)):
            engine = RolloutEngine(factory, tokenizer, config)
            try:
                results[name] = engine.run(FAULTS, always_go(tokenizer))
                if name == "remote":  # the server still serves: a second round on the same pool wins
                    again = engine.run([task("count", 2, 10), task("count", 1, 11)], always_go(tokenizer))
                    assert [e.won for e in again.episodes] == [True, True]
            finally:
                engine.close()
    assert not [w for w in caught if "left out" in str(w.message)]
    episodes = {name: {e.task.task + str(e.task.seed): e for e in r.episodes} for name, r in results.items()}
    for key, local_episode in episodes["local"].items():
        remote_episode = episodes["remote"][key]
        assert (remote_episode.failed, remote_episode.won) == (local_episode.failed, local_episode.won), key
        assert len(remote_episode.turns) == len(local_episode.turns), key
    failures = {e.task.task: e.failure for e in results["remote"].episodes if e.failed}
    assert set(failures) == {"raise", "hang_forever", "die", "bad_won", "project_raise", "reset_raise", "old_shape"}
    assert "RuntimeError: scripted env failure" in failures["raise"]
    assert failures["hang_forever"].startswith("TimeoutError: env server")
    assert "WorkerDiedError" in failures["die"]  # the server's worker process died, not the server
    assert "EnvProtocolError" in failures["bad_won"] and "info['won']" in failures["bad_won"]
    assert "scripted projection failure" in failures["project_raise"]
    assert "scripted reset failure" in failures["reset_raise"] and "old 4-tuple" in failures["old_shape"]
    counts = {
        name: rollout_metrics(r, config)["failures"] for (name, r), config in zip(results.items(), (local, remote))
    }
    assert counts == {"local": 7.0, "remote": 7.0}


def test_a_server_killed_mid_episode_is_left_out_with_one_warning(servers, tokenizer):
    """Sessions alternate between a live server and one whose env kills the whole server process (threads mode)
    mid-episode: that server's episodes fail (ServerLostError), the others win, one warning names it, and the next
    rollout runs on the live server only."""
    proc, doomed = _start("envs_for_tests:ScriptedFactory", "--env_workers", "threads")
    try:
        _wait(proc, doomed)
        config = RolloutConfig(max_turns=6, step_timeout_s=10.0, num_workers=8,
                               env_server_urls=[servers["scripted"], doomed])  # fmt: skip
        # placement is in order, to the least loaded server: even positions -> the live one, odd -> the doomed one
        tasks = [task("count", 3, 0), task("count", 4, 1), task("count", 3, 2), task("die", 2, 3)]
        tasks += [task("count", 2, 4), task("count", 4, 5)]
        engine = RolloutEngine(ScriptedFactory(), tokenizer, config)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = engine.run(tasks, always_go(tokenizer))
                again = engine.run([task("count", 2, 6), task("count", 3, 7)], always_go(tokenizer))
            assert [s.sessions for s in engine.pool.servers] == [3, 0]
        finally:
            engine.close()
        assert proc.wait(10) == 3  # the env's os._exit(3) took the server down
    finally:
        _stop(proc)
    assert [(e.failed, e.won) for e in result.episodes] == [(False, True), (True, False)] * 3
    assert all(e.failure.startswith("ServerLostError") and doomed in e.failure for e in result.episodes if e.failed)
    assert rollout_metrics(result, config)["failures"] == 3.0
    left_out = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(left_out) == 1 and doomed in left_out[0]
    assert all(e.won and not e.failed for e in again.episodes)


def test_session_limits_fail_what_no_server_can_take_and_move_the_rest(servers, tokenizer):
    """Alone, a server holding 2 sessions takes 2 of 3 episodes and the third fails naming the limit; beside another
    server, the sessions it refuses move there and every episode wins."""
    config = RolloutConfig(max_turns=4, num_workers=8, env_server_urls=[servers["small"]])
    result = run_episodes(
        always_go(tokenizer), ScriptedFactory(), [task("count", 2, s) for s in range(3)], tokenizer, config
    )
    assert [r["won"] for r in result].count(True) == 2 and [r["failed"] for r in result].count(True) == 1
    assert all("every env server is at its session limit" in r["failure"] for r in result if r["failed"])
    config = RolloutConfig(max_turns=4, num_workers=8, env_server_urls=[servers["small"], servers["scripted"]])
    engine = RolloutEngine(ScriptedFactory(), tokenizer, config)
    try:
        episodes = engine.run([task("count", 2, s) for s in range(6)], always_go(tokenizer)).episodes
        small, other = (s.sessions for s in engine.pool.servers)
    finally:
        engine.close()
    assert all(e.won and not e.failed for e in episodes)
    assert small <= 2 and small + other == 6


class _MisbehavingServer:
    """A WebSocket server speaking OpenEnv's messages, badly: the reset's seed picks what its step replies."""

    def __init__(self):
        from websockets.sync.server import serve

        def http(connection, request):
            if request.path == "/health":
                return connection.respond(200, '{"status": "healthy"}')
            if request.path == "/schema":
                return connection.respond(200, json.dumps({"action": {"properties": {"message": {"type": "string"}}}}))
            return None

        self.server = serve(self.handler, "127.0.0.1", 0, process_request=http)
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def handler(ws):
        seed = None
        for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "reset":
                seed = msg["data"]["seed"]
                obs = {"text": "start", "goal": "win", "admissible": ["go"]}
                ws.send(
                    json.dumps({"type": "observation", "data": {"observation": obs, "reward": None, "done": False}})
                )
                continue
            assert msg["data"] == {"message": "go"}  # the action text went into the schema's one string field
            if seed == 0:
                ws.send("this is not json")
            elif seed == 1:
                ws.send(json.dumps({"type": "observation", "data": {"observation": {"text": 5}}}))
            elif seed == 2:
                return  # drops the connection
            elif seed == 3:
                ws.send(json.dumps({"type": "observation", "data": {"observation": "won"}}))
            else:  # a foreign env's well-formed reply: won in the metadata, terminated = done
                obs = {"text": "you won", "metadata": {"won": True}}
                ws.send(json.dumps({"type": "observation", "data": {"observation": obs, "reward": 1.0, "done": True}}))

    def close(self):
        self.server.shutdown()


def test_malformed_replies_and_dropped_connections_fail_their_episodes(tokenizer):
    fake = _MisbehavingServer()
    try:
        config = RolloutConfig(max_turns=3, step_timeout_s=5.0, num_workers=8, env_server_urls=[fake.url])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            episodes = run_episodes(
                always_go(tokenizer), ScriptedFactory(), [task("count", 1, s) for s in range(5)], tokenizer, config
            )
    finally:
        fake.close()
    assert [r["failed"] for r in episodes] == [True, True, True, True, False]
    assert "not JSON" in episodes[0]["failure"] and "step() observation" in episodes[1]["failure"]
    assert episodes[2]["failure"].startswith("ServerLostError") and "expected an observation" in episodes[3]["failure"]
    assert episodes[4]["won"] and episodes[4]["env_return"] == 1.0 and episodes[4]["turns"][0]["action"] == "go"
    assert not [w for w in caught if "left out" in str(w.message)]  # it still answers /health: not a dead server


def test_unreachable_or_malformed_server_url_is_one_line_and_exit_2(capsys):
    from epo_trl.cli import main

    port = _free_port()
    argv = ["eval", "--policy", "walker", "--env", "maze", "--env_server_urls", f"[http://127.0.0.1:{port}]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"env server http://127.0.0.1:{port} is unreachable" in err and "Traceback" not in err
    assert main(["eval", "--policy", "walker", "--env", "maze", "--env_server_urls", "[nowhere]"]) == 2
    assert "'nowhere' is not of the form http://HOST:PORT" in capsys.readouterr().err


# --- OpenEnv's client, and TRL --------------------------------------------------------------------------------------
def test_a_plain_openenv_client_plays_a_served_maze_to_a_win(servers):
    from epo_trl.envs.openenv_client import TextAction, TextEnvClient

    factory = MazeFactory(**MAZE_KWARGS)
    spec = factory.tasks("valid_seen")[2]
    with TextEnvClient(base_url=servers["maze"][0]).sync() as env:
        result = env.reset(split="valid_seen", index=2)
        assert result.observation.task == spec.key() and result.observation.admissible
        assert env.step(TextAction(text="   ")).observation.action is None  # rejected by project_action: no step
        for command in factory.solve(spec):
            result = env.step(TextAction(text=command))
        assert result.done and result.observation.won and result.observation.terminated
        with pytest.raises(RuntimeError, match="the episode is over"):
            env.step(TextAction(text="look"))


def test_plain_trl_grpo_trains_on_served_mazes_and_the_expert_wins(servers, tmp_path):
    """trl.GRPOTrainer with `environment_factory` whose envs are sessions on the two servers (OpenEnv's client):
    3 steps, every reward equals a local replay of the rollout; then the expert's actions win through the tool."""
    import torch
    from helpers import tiny_args
    from tool_policy import ScriptedToolPolicy, admissible_call
    from trl import GRPOConfig, GRPOTrainer

    from epo_trl.envs.openenv_client import OpenEnvFactory
    from epo_trl.envs.trl_env import tool_dataset, trl_environment
    from epo_trl.models.tiny import build_tiny_model, env_words

    base = MazeFactory(**MAZE_KWARGS)
    factory = OpenEnvFactory(base, servers["maze"])
    records = []

    def spy(completions, task, environments, **kwargs):
        records.extend(zip(task, completions, [e.get_reward() for e in environments], strict=True))
        return [0.01 * len(c) for c in completions]

    model = build_tiny_model(str(tmp_path / "model"), env_words(base), tool_calling=True)
    args = tiny_args(GRPOConfig, tmp_path, max_steps=3, max_completion_length=1024)
    trainer = GRPOTrainer(model, spy, args=args, train_dataset=tool_dataset(factory, limit=8),
                          environment_factory=trl_environment(factory, max_turns=6))  # fmt: skip
    ScriptedToolPolicy(trainer, admissible_call, stop_probability=0.05)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert len(records) == 12 and all(r is not None for _, _, r in records)
    for key, completion, reward in records:
        assert reward == float(replay_tool_calls(base, key, completion, 6))
    env = trl_environment(factory)()
    spec = base.tasks("train")[1]
    assert "Goal:" in env.reset(task=spec.key())
    for command in base.solve(spec):
        env.act(command)
    assert env.done and env.won and env.get_reward() == 1.0


def test_epo_trainer_trains_three_steps_on_remote_mazes(servers, tmp_path):
    from epo_trl import EPOConfig, EPOTrainer
    from epo_trl.envs import task_dataset
    from epo_trl.models.tiny import build_tiny_model, env_words
    from epo_trl.rollout import StepRollout, episode_return_reward

    factory = MazeFactory(**MAZE_KWARGS)
    model = build_tiny_model(str(tmp_path / "model"), env_words(factory))
    config = RolloutConfig(max_turns=3, max_turn_tokens=8, num_workers=8, env_server_urls=servers["maze"])
    rollout = StepRollout(factory, config)
    args = EPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=8, max_steps=3, learning_rate=1e-3, use_cpu=True, bf16=False,
                     report_to=[], logging_steps=1, save_strategy="no", seed=3, disable_tqdm=True)  # fmt: skip
    trainer = EPOTrainer(model=model, reward_funcs=[episode_return_reward], args=args,
                         train_dataset=task_dataset(factory), rollout_func=rollout)  # fmt: skip
    try:
        trainer.train()
    finally:
        rollout.close()
    logs = [h for h in trainer.state.log_history if "rollout/success_rate" in h]
    assert trainer.state.global_step == 3 and len(logs) == 3
    assert all(h["rollout/env_failures"] == 0 for h in logs)


def test_server_urls_and_the_action_field():
    from epo_trl.envs.pool.remote import action_field, server_urls

    assert server_urls("http://node1:8001") == ("http://node1:8001", "ws://node1:8001/ws")
    assert server_urls("wss://env.example:443/sub/") == ("https://env.example:443/sub", "wss://env.example:443/sub/ws")
    for bad in ("node1:8001", "http://node1", "ftp://node1:21", "http://:80"):
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            server_urls(bad)
    string = {"type": "string"}
    assert action_field({"action": {"properties": {"text": string, "metadata": {"type": "object"}}}}, "u") == "text"
    assert (
        action_field({"action": {"properties": {"message": string, "metadata": {"type": "object"}}}}, "u") == "message"
    )
    with pytest.raises(ValueError, match="no single string field"):
        action_field({"action": {"properties": {"a": string, "b": string}}}, "u")


def _served_expert_wins(env_name: str, env_kwargs: dict, factory, spec) -> None:
    """Serve `env_name`; OpenEnv's own client and the TRL environment class (what `GRPOTrainer`'s
    `environment_factory` calls) each play the expert's commands for `spec` on a session of their own, and win."""
    from epo_trl.envs.openenv_client import OpenEnvFactory, TextAction, TextEnvClient
    from epo_trl.envs.trl_env import trl_environment

    plan = factory.solve(spec)
    proc, url = _start(env_name, "--env_kwargs", json.dumps(env_kwargs), "--max_sessions", "2")
    try:
        _wait(proc, url, limit_s=240)
        with TextEnvClient(base_url=url).sync() as client:
            result = client.reset(task=spec.key())
            assert result.observation.task == spec.key()
            for command in plan:
                result = client.step(TextAction(text=command))
            assert result.done and result.observation.won and result.observation.terminated
        env = trl_environment(OpenEnvFactory(factory, [url], timeout=240))()
        assert "Goal:" in env.reset(task=spec.key())
        for command in plan:
            env.act(command)
        assert env.done and env.won and env.get_reward() == 1.0
    finally:
        _stop(proc)


def test_a_served_alfworld_game_is_won_by_the_expert_through_openenv_and_trl(alfworld_data):
    from epo_trl.envs.alfworld.env import ALFWorldFactory

    kwargs = {"data_path": alfworld_data, "expert": "handcoded"}
    factory = ALFWorldFactory(**kwargs)
    _served_expert_wins("alfworld", kwargs, factory, factory.tasks("train")[0])


def test_a_served_scienceworld_task_is_won_by_the_expert_through_openenv_and_trl():
    import shutil

    pytest.importorskip("scienceworld")
    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java")
    from epo_trl.envs.scienceworld import ScienceWorldFactory

    kwargs = {"task_names": ["lifespan-longest-lived"], "held_out_tasks": [], "max_variations_per_task": 2}
    factory = ScienceWorldFactory(**kwargs)
    try:
        _served_expert_wins("scienceworld", kwargs, factory, factory.tasks("train")[0])
    finally:
        factory.close()  # the expert's JVM
