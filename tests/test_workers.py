"""Env workers: threads vs processes give the same episodes; process workers isolate hangs, crashes and garbage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from envs_for_tests import ScriptedFactory, admissible_picker, always_go, maze_tokenizer, task

from epo_trl.envs.maze import MazeFactory
from epo_trl.envs.pool import EnvPool, ProcessEnvPool, ThreadEnvPool, create_pool, resolve_kind, worker_main
from epo_trl.rollout import RolloutConfig, RolloutEngine, run_episodes


@pytest.fixture(scope="module")
def tokenizer():
    return maze_tokenizer()


def test_auto_picks_the_factory_preference():
    assert resolve_kind(MazeFactory(), "auto") == "threads"
    assert resolve_kind(ScriptedFactory(), "processes") == "processes"
    alfworld = pytest.importorskip("epo_trl.envs.alfworld")
    assert alfworld.ALFWorldFactory.thread_safe is False
    with pytest.raises(ValueError, match="env_workers"):
        RolloutConfig(env_workers="fibers")


def test_processes_isolate_raise_hang_crash_and_garbage(tokenizer):
    """One worker holds every env: the bad episodes fail alone, the good ones are rebuilt after each kill and win."""
    tasks = [task("count", 3, 0), task("raise", 2, 1), task("hang", 2, 2), task("count", 4, 3)]
    tasks += [task("die", 2, 4), task("bad_won", 1, 5), task("project_raise", 1, 6), task("count", 2, 7)]
    config = RolloutConfig(max_turns=6, step_timeout_s=1.0, num_workers=1, env_workers="processes")
    engine = RolloutEngine(ScriptedFactory(), tokenizer, config)
    try:
        assert isinstance(engine.pool, ProcessEnvPool)
        episodes = engine.run(tasks, always_go(tokenizer)).episodes
        failures = {e.task.task: e.failure for e in episodes if e.failed}
        assert [e.won for e in episodes if e.task.task == "count"] == [True] * 3
        assert [len(e.turns) for e in episodes if e.task.task == "count"] == [3, 4, 2]
        assert set(failures) == {"raise", "hang", "die", "bad_won", "project_raise"}
        assert "RuntimeError: scripted env failure" in failures["raise"]
        assert "TimeoutError" in failures["hang"] and "WorkerDiedError" in failures["die"]
        assert "'scripted'" in failures["bad_won"] and "info['won']" in failures["bad_won"]
        assert "scripted projection failure" in failures["project_raise"]
        # the pool keeps working after its worker was replaced twice
        again = engine.run([task("count", 2, 8), task("count", 1, 9)], always_go(tokenizer)).episodes
        assert all(e.won and not e.failed for e in again)
    finally:
        engine.close()
    assert not any(w.process.is_alive() for w in engine.pool.workers)


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_threads_and_processes_give_the_same_maze_episodes(tokenizer, mode):
    factory = MazeFactory(size=3, task="mixed")
    tasks = factory.tasks("valid_seen")[:6] * 2
    records = {}
    for kind in ("threads", "processes"):
        config = RolloutConfig(max_turns=8, max_turn_tokens=16, num_workers=2, env_workers=kind)
        records[kind] = run_episodes(admissible_picker(tokenizer), factory, tasks, tokenizer, config, mode)
    assert records["threads"] == records["processes"]
    assert sum(len(r["turns"]) for r in records["threads"]) > 2 * len(tasks)  # the policy really walks around


def test_threads_and_processes_give_the_same_alfworld_episodes(tmp_path, tokenizer):
    pytest.importorskip("alfworld")
    from epo_trl.envs.alfworld.env import ALFWorldFactory
    from epo_trl.envs.alfworld.games import write_sample_games

    write_sample_games(tmp_path)
    factory = ALFWorldFactory(data_path=str(tmp_path))
    tasks = factory.tasks("train")[:1] * 2
    records = {}
    for kind in ("threads", "processes"):  # one thread: TextWorld is not thread-safe
        workers = 1 if kind == "threads" else 2
        config = RolloutConfig(max_turns=6, max_turn_tokens=48, num_workers=workers, env_workers=kind)
        records[kind] = run_episodes(admissible_picker(tokenizer), factory, tasks, tokenizer, config)
    assert records["threads"] == records["processes"]
    assert all(len(r["turns"]) == 6 and not r["failed"] for r in records["threads"])


def test_a_replay_that_diverges_fails_the_rebuilt_episode(tokenizer, monkeypatch):
    """Rebuilding relies on deterministic envs; a mismatch fails the episode instead of training on a wrong state."""
    config = RolloutConfig(max_turns=4, step_timeout_s=1.0, num_workers=1, env_workers="processes")
    engine = RolloutEngine(ScriptedFactory(), tokenizer, config)
    try:
        pool = engine.pool
        handles = [pool.acquire(), pool.acquire()]
        assert all(ok for ok, _ in pool.reset(list(zip(handles, [task("count", 3), task("count", 3)]))))
        assert all(ok for ok, _ in pool.act([(h, "go") for h in handles]))
        handles[1].obs = "something the env never said"  # as if the env were not deterministic
        pool.workers[0].kill()
        first, second = pool.act([(h, "go") for h in handles])
        value = {
            "action": "go",
            "obs": "count 1",
            "reward": 0.0,
            "terminated": False,
            "truncated": False,
            "won": False,
        }
        assert first == (True, {**value, "admissible": ["go"]})
        assert not second[0] and "could not be rebuilt" in str(second[1])
    finally:
        engine.close()


def test_worker_protocol_messages_are_plain_json(monkeypatch):
    """Every message a worker reads or writes survives JSON: a socket transport could carry it unchanged."""
    inbox = [
        {
            "ops": [
                {"op": "reset", "slot": 1, "task": task("count", 2).to_dict()},
                {"op": "act", "slot": 1, "text": "go"},
            ]
        },
        {"ops": [{"op": "act", "slot": 1, "text": "go"}, {"op": "close", "slot": 1}]},
        {"ops": [{"op": "replay", "slot": 2, "task": task("raise", 2).to_dict(), "commands": ["go"]}]},
        {"shutdown": True},
    ]
    outbox = []

    class Conn:
        def recv(self):
            return json.loads(json.dumps(inbox.pop(0)))

        def send(self, msg):
            outbox.append(json.loads(json.dumps(msg)))

    monkeypatch.setattr(os, "setsid", lambda: None)
    monkeypatch.setattr("epo_trl.envs.pool.wire._watch_parent", lambda parent: None)
    worker_main(Conn(), ScriptedFactory())
    assert outbox[0] == {"ready": True} and len(outbox) == 6
    assert outbox[1]["value"] == {"obs": "count 2", "goal": "reach zero", "admissible": ["go"]}
    assert outbox[3]["value"]["won"] is True and outbox[4] == {"ok": True, "value": {}}
    assert outbox[5] == {"ok": False, "error": "RuntimeError", "message": "scripted env failure"}


def test_a_hung_worker_does_not_keep_the_process_alive():
    """A trainer that never closes its rollout still exits, and takes its worker processes with it."""
    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from envs_for_tests import WORDS, ScriptedFactory, task
from epo_trl.rollout import CallableBackend, RolloutConfig, RolloutEngine
from epo_trl.models.tiny import build_tokenizer

if __name__ == "__main__":
    tok = build_tokenizer(WORDS)
    ids = tok("<action> go </action>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    config = RolloutConfig(max_turns=3, step_timeout_s=0.5, num_workers=2, env_workers="processes")
    engine = RolloutEngine(ScriptedFactory(), tok, config)
    result = engine.run([task("hang_forever"), task("count")], CallableBackend(lambda p, n, t: [ids for _ in p]))
    engine.pool.workers[1].conn.send({{"ops": [{{"op": "reset", "slot": 99, "task": task("hang_forever").to_dict()}},
                                              {{"op": "act", "slot": 99, "text": "go"}}]}})  # busy forever at exit
    print("failed:", [e.failed for e in result.episodes], flush=True)
    print("pids:", [w.process.pid for w in engine.pool.workers], flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed: [True, False]" in proc.stdout
    pids = json.loads(proc.stdout.split("pids:")[1].strip())
    assert not [pid for pid in pids if _alive(pid)], "worker processes outlived the trainer"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_thread_pool_is_the_default_for_thread_safe_envs(tokenizer):
    engine = RolloutEngine(MazeFactory(), tokenizer, RolloutConfig())
    assert isinstance(engine.pool, ThreadEnvPool) and isinstance(engine.pool, EnvPool)
    engine.close()


def test_worker_processes_import_no_torch():
    """A worker process imports only `epo_trl.envs` and the env's own package: no torch, TRL or vLLM (seconds of
    start-up and hundreds of MB per worker otherwise), even though this test process has them all loaded."""
    import sys

    from env_import_probe import ProbeFactory

    assert "torch" in sys.modules  # the parent has it: the worker must not inherit or re-import it
    pool = create_pool(ProbeFactory(), num_workers=1, timeout=120.0, kind="processes")
    try:
        assert isinstance(pool, ProcessEnvPool)
        handle = pool.acquire()
        [(ok, value)] = pool.reset([(handle, ProbeFactory().tasks()[0])])
        assert ok, value
        assert value["obs"] == "none", f"the worker process loaded: {value['obs']}"
    finally:
        pool.close()


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_an_env_that_truncates_and_one_that_terminates_report_the_right_flag(tokenizer, kind):
    """`limit` runs into its own step limit (truncated, no outcome); `count` ends by the task's rules (terminated,
    won). Both flags cross the pool as they were returned, and the episodes record them with the env's rewards."""
    pool = create_pool(ScriptedFactory(), num_workers=2, timeout=60.0, kind=kind)
    try:
        handles = [pool.acquire(), pool.acquire()]
        assert all(ok for ok, _ in pool.reset(list(zip(handles, [task("count", 2), task("limit", 2)]))))
        first = [value for _, value in pool.act([(h, "go") for h in handles])]
        assert [(v["terminated"], v["truncated"], v["admissible"]) for v in first] == [(False, False, ["go"])] * 2
        last = [value for _, value in pool.act([(h, "go") for h in handles])]
        assert last[0] == {"action": "go", "obs": "won", "reward": 1.0, "terminated": True, "truncated": False,
                           "won": True, "admissible": None}  # fmt: skip
        assert last[1] == {"action": "go", "obs": "out of moves", "reward": 0.5, "terminated": False,
                           "truncated": True, "won": False, "admissible": None}  # fmt: skip
    finally:
        pool.close()

    config = RolloutConfig(max_turns=5, num_workers=2, env_workers=kind)
    records = run_episodes(always_go(tokenizer), ScriptedFactory(), [task("count", 2), task("limit", 3)], tokenizer,
                           config, "step")  # fmt: skip
    count, limit = records
    assert (count["won"], count["terminated"], count["truncated"], count["length"]) == (True, True, None, 2)
    assert (limit["won"], limit["terminated"], limit["truncated"], limit["length"]) == (False, False, "env_limit", 3)
    assert (count["env_return"], limit["env_return"]) == (1.0, 1.5)  # the env's own rewards, summed
    assert (count["return"], limit["return"]) == (10.0, 0.0)  # the training return is still the rollout's
    # the rollout's own turn limit is a truncation too, of another kind
    [cut] = run_episodes(always_go(tokenizer), ScriptedFactory(), [task("count", 9)], tokenizer, config, "step")
    assert (cut["won"], cut["terminated"], cut["truncated"], cut["length"]) == (False, False, "turn_limit", 5)


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_the_same_scripted_actions_give_identical_records_through_both_pools(tokenizer, mode):
    """Terminating, truncating (the env's limit and the rollout's) and failing episodes, one batch, both pools."""
    tasks = [task("count", 3, 0), task("limit", 2, 1), task("count", 9, 2), task("limit", 5, 3)]
    tasks += [task("old_shape", 1, 4), task("count", 1, 5), task("bad_reward", 1, 6), task("limit", 1, 7)]
    records = {}
    for kind in ("threads", "processes"):
        config = RolloutConfig(max_turns=4, num_workers=2, env_workers=kind)
        records[kind] = run_episodes(always_go(tokenizer), ScriptedFactory(), tasks, tokenizer, config, mode)
    assert records["threads"] == records["processes"]
    summary = [(r["won"], r["terminated"], r["truncated"], r["failed"], r["length"]) for r in records["threads"]]
    assert summary == [
        (True, True, None, False, 3),
        (False, False, "env_limit", False, 2),
        (False, False, "turn_limit", False, 4),
        (False, False, "turn_limit", False, 4),  # the rollout's limit (4 turns) comes before the env's (5 steps)
        (False, False, None, True, 1),
        (True, True, None, False, 1),
        (False, False, None, True, 1),
        (False, False, "env_limit", False, 1),
    ]


def test_the_old_four_tuple_step_fails_with_the_fix_named(tokenizer):
    [record] = run_episodes(always_go(tokenizer), ScriptedFactory(), [task("old_shape", 2)], tokenizer,
                            RolloutConfig(max_turns=3, env_workers="threads"), "step")  # fmt: skip
    assert record["failed"] and "EnvProtocolError" in record["failure"]
    assert "(observation, reward, done, info)" in record["failure"]
    assert "(observation, reward, terminated, truncated, info)" in record["failure"]
