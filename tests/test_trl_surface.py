"""The TRL / transformers / accelerate / vLLM names epo_trl relies on (epo_trl/trainers/trl_surface.py) exist in the
installed versions, the code uses no undeclared one and reads none with a silent default, and the TRL loss
semantics copied into the base trainer (LOSS_NORMALISATION) match TRL's own loss for every loss type it allows."""

import importlib
import pathlib
import re

import pytest
import torch
from helpers import length_reward, prompt_dataset, step_mode_batch, tiny_args, trl_loss_types

from epo_trl.trainers import trl_surface
from epo_trl.trainers.grpo.grpo_trainer import LOSS_NORMALISATION
from epo_trl.trainers.trl_surface import GRPO_TRAINER, SURFACE, Name, problems

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("trl", "transformers", "accelerate")
# Files that may not change in this piece of work and still read a declared name with a default (see the report).
SILENT_DEFAULT_EXEMPT = {"epo_trl/rollout/engine.py"}


@pytest.fixture(scope="module")
def trainer(tiny_model, tmp_path_factory):
    """A real GRPOTrainer-derived trainer (the `--algo grpo` one), built once: instance attributes are checked on it."""
    from epo_trl import MultiTurnGRPOConfig, MultiTurnGRPOTrainer

    out = tmp_path_factory.mktemp("surface")
    return MultiTurnGRPOTrainer(
        tiny_model, length_reward, args=tiny_args(MultiTurnGRPOConfig, out), train_dataset=prompt_dataset()
    )


def test_installed_libraries_have_every_declared_name(trainer):
    found = problems(instance=trainer, libraries=LIBRARIES)
    assert not found, "the installed libraries lack names epo_trl uses:\n" + "\n".join(found)


def test_installed_vllm_has_every_declared_name():
    try:
        importlib.import_module("vllm")
    except ImportError as e:
        pytest.skip(f"vLLM is not importable ({e}): its part of the surface is unchecked here")
    vllm_entries = [e for e in SURFACE if "vllm" in (e.library, e.requires)]
    found = problems(vllm_entries, libraries=(*LIBRARIES, "vllm"))
    assert not found, "the installed vLLM lacks names epo_trl uses:\n" + "\n".join(found)


def test_the_check_names_what_is_missing(trainer):
    """A surface with a bogus name of every kind: the check reports each, naming the library and the name."""
    bogus = (
        Name("trl", GRPO_TRAINER, "scale_rewardz", trl_surface.INSTANCE, ("epo_trl/x.py",)),
        Name("trl", GRPO_TRAINER, "_bogus_state", trl_surface.ASSIGNED, ("epo_trl/x.py",)),
        Name("trl", GRPO_TRAINER, "_bogus_method", trl_surface.CLASS, ("epo_trl/x.py",)),
        Name("trl", trl_surface.GRPO_CONFIG, "bogus_field", trl_surface.FIELD, ("epo_trl/x.py",)),
        Name("transformers", "transformers.integrations.deepspeed", "_bogus_ref", trl_surface.MODULE, ("x",)),
        Name("transformers", trl_surface.TRAINING_ARGS, "output_dir", trl_surface.CACHED, ("x",)),
        Name("transformers", trl_surface.DYNAMIC_CACHE, "bogus_kwarg", trl_surface.PARAMETER, ("x",)),
        Name("accelerate", "accelerate.state:NoSuchState", "_set_sync_gradients", trl_surface.CLASS, ("x",)),
        Name("trl", GRPO_TRAINER, "_generate", trl_surface.RETURNS, ("x",), returns=("prompt_ids", "completion_ids")),
    )
    surface = (*[e for e in SURFACE if e.library in LIBRARIES and not e.requires], *bogus)
    found = problems(surface, instance=trainer, libraries=LIBRARIES)
    assert len(found) == len(bogus), "\n".join(found)
    for entry, message in zip(bogus, found):
        assert message.startswith(f"{entry.library}: ") and entry.name in message, message
    assert "scale_rewardz" in found[0] and "instance attribute" in found[0] and "epo_trl/x.py" in found[0]
    assert "NoSuchState" in found[7]
    assert "extra_fields" in found[8]  # the tuple TRL returns, beside the one epo_trl unpacks


def test_every_entry_names_the_files_that_use_it():
    for entry in SURFACE:
        assert entry.used_in, entry
        for path in entry.used_in:
            file = ROOT / path
            assert file.is_file(), f"{entry.name}: {path} does not exist"
            assert entry.name in file.read_text(), f"{path} does not use `{entry.name}` ({entry.library})"


def _code_files():
    skip = ("epo_trl/trainers/trl_surface.py",)
    return [p for p in sorted((ROOT / "epo_trl").rglob("*.py")) if str(p.relative_to(ROOT)) not in skip]


def _trainer_uses(path: pathlib.Path, text: str) -> set[str]:
    """Attribute names read or written on a trainer in `text`: `trainer.x`, `getattr(trainer, "x"...)`, and `self.x` /
    `def x` in the trainer classes."""
    names = set(re.findall(r"\btrainer\.(\w+)", text)) | set(
        re.findall(r"getattr\(\s*(?:trainer|self),\s*\"(\w+)\"", text)
    )
    if path.name.endswith("_trainer.py") and path.parent.parent.name == "trainers":
        names |= set(re.findall(r"\bself\.(\w+)", text)) | set(re.findall(r"^    def (\w+)", text, re.M))
    return names


def test_code_uses_no_undeclared_trl_trainer_name():
    """Every GRPOTrainer name epo_trl touches that TRL's trainer source defines (its own attributes and methods, and
    transformers' private ones) is declared in the surface."""
    from transformers import Trainer
    from trl import GRPOTrainer

    trl_names = _source_names(GRPOTrainer) - {n for n in dir(Trainer) if not n.startswith("_")}  # public: stable
    hf_private = {n for n in _source_names(Trainer) if n.startswith("_") and not n.startswith("__")}
    declared = {e.name for e in SURFACE if e.owner in (GRPO_TRAINER, trl_surface.HF_TRAINER)}
    undeclared = {}
    for path in _code_files():
        for name in _trainer_uses(path, path.read_text()) & (trl_names | hf_private):
            if name not in declared and not name.startswith("__"):
                undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"declare these in epo_trl/trainers/trl_surface.py: {undeclared}"


def _source_names(cls) -> set[str]:
    import inspect

    text = inspect.getsource(cls)
    return set(re.findall(r"\bself\.(\w+)\s*(?::[^=\n]*)?=(?!=)", text)) | set(
        re.findall(r"^    def (\w+)", text, re.M)
    )


def test_declared_names_are_read_without_defaults():
    """`getattr(x, "declared", default)` would turn a rename upstream into a silent change of behaviour."""
    declared = {e.name for e in SURFACE}
    found = []
    for path in _code_files():
        rel = str(path.relative_to(ROOT))
        if rel in SILENT_DEFAULT_EXEMPT:
            continue
        for owner, name in re.findall(r"getattr\(\s*([\w.]+),\s*\"(\w+)\",", path.read_text()):
            if name in declared and owner in ("self", "trainer", "trainer.args", "self.args", "args"):
                found.append(f"{rel}: getattr({owner}, {name!r}, ...)")
    assert not found, "\n".join(found)


# --- TRL's loss semantics: LOSS_NORMALISATION against TRL's _compute_loss ------------------------------------------
def test_the_table_covers_every_trl_loss_type():
    allowed = trl_loss_types()
    assert "dapo" in allowed and len(allowed) >= 7, allowed
    assert set(LOSS_NORMALISATION) == set(allowed), (
        f"LOSS_NORMALISATION has {sorted(LOSS_NORMALISATION)}, TRL allows {sorted(allowed)}"
    )


@pytest.fixture(scope="module")
def trl_trainer(tiny_model, tmp_path_factory):
    from trl import GRPOConfig, GRPOTrainer

    out = tmp_path_factory.mktemp("loss_probe")
    trainer = GRPOTrainer(tiny_model, length_reward, args=tiny_args(GRPOConfig, out), train_dataset=prompt_dataset())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a real run
    return trainer


def _chunk(batch, rows, token_share):
    n = batch["completion_ids"].size(0)
    out = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.size(0) == n else v for k, v in batch.items()}
    out["num_items_in_batch"] = batch["num_items_in_batch"] * token_share  # as the base trainer's row chunks do
    return out


@pytest.mark.parametrize("loss_type", trl_loss_types())
def test_loss_normalisation_matches_trl(trl_trainer, loss_type):
    """TRL's loss of a micro-batch is the row-weighted or the token-weighted sum of its chunks' losses: which one is
    what LOSS_NORMALISATION must say (a wrong entry would give row chunks the wrong gradient)."""
    trainer = trl_trainer
    trainer.loss_type = loss_type
    trainer.importance_sampling_level = "sequence" if loss_type == "luspo" else "token"  # TRL requires it for luspo
    batch = step_mode_batch(trainer.processing_class)
    batch = {k: v for k, v in batch.items() if k not in ("turn_ids", "_epo_prepared")}  # TRL's own keys only
    tokens = batch["completion_mask"].sum(1).double()
    parts = [slice(0, 1), slice(1, 5)]
    with torch.no_grad():
        full = trainer._compute_loss(trainer.model, batch).item()
        chunks = []
        for rows in parts:
            share = (tokens[rows].sum() / tokens.sum()).item()
            chunks.append((trainer._compute_loss(trainer.model, _chunk(batch, rows, share)).item(), share))
    n = len(tokens)
    by_rows = sum(loss * (r.stop - r.start) / n for (loss, _), r in zip(chunks, parts))
    by_tokens = sum(loss * share for loss, share in chunks)
    assert abs(by_rows - by_tokens) > 1e-3 * max(abs(full), 1e-3), "the probe batch does not tell the two apart"
    trl_says = [k for k, v in (("rows", by_rows), ("tokens", by_tokens)) if v == pytest.approx(full, rel=1e-5)]
    assert trl_says == [LOSS_NORMALISATION[loss_type]], (
        f"loss_type={loss_type!r}: TRL's loss {full:.6g} is normalised by {trl_says or 'neither'} "
        f"(rows {by_rows:.6g}, tokens {by_tokens:.6g}); LOSS_NORMALISATION says {LOSS_NORMALISATION[loss_type]!r}"
    )


def test_an_unknown_loss_type_stops_row_chunks_loudly(trainer, monkeypatch):
    """A loss type TRL adds later must not be chunked by a guess."""
    monkeypatch.setattr(trainer, "loss_type", "new_loss")
    monkeypatch.setattr(trainer.args, "max_rows_per_backward", 2)
    with pytest.raises(ValueError, match="loss_type='new_loss' is not in LOSS_NORMALISATION"):
        trainer._row_chunks(step_mode_batch(trainer.processing_class))
