"""The config parser every `epo-trl` command shares.

The parser is TRL's `TrlParser` (an `HfArgumentParser`) over the command's dataclasses, so flags are typed by
the dataclass field, choices and help text come from field metadata, and a YAML file (`--config FILE` as with
`trl grpo`, or the file as first argument) sets the defaults that flags override. Values written in the YAML
file keep their YAML types; values on the command line are typed by the field (`--run_name no` is the string
"no"). What we add: every key must belong to exactly one dataclass, no abbreviated flags, one-line errors that
name the closest key (epo_trl.cli.errors), and the source of every value (flag, file or default).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError, user_errors

FLAG, FILE, DEFAULT = "flag", "file", "default"  # where a value came from, most explicit first


def shared_fields(dataclass_types: Sequence[type]) -> dict[str, list[str]]:
    """Field names that more than one of the dataclasses accepts -> the classes that define them."""
    owners: dict[str, list[str]] = {}
    for cls in dataclass_types:
        for f in dataclasses.fields(cls):
            if f.init:
                owners.setdefault(f.name, []).append(cls.__name__)
    return {name: classes for name, classes in owners.items() if len(classes) > 1}


def _unique_key_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (SafeLoader keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):  # before `<<:` merges are flattened in: those may be overridden
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node.start_mark)
                    except TypeError:  # an unhashable key: SafeLoader's own error names it
                        continue
                    if first is not key_node.start_mark:
                        raise yaml.constructor.ConstructorError(
                            f"while reading the mapping at line {node.start_mark.line + 1}",
                            node.start_mark,
                            f"key {key!r} appears twice (first at line {first.line + 1}); the second would silently "
                            "replace the first",
                            key_node.start_mark,
                        )
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def safe_load(text_or_file):
    """`yaml.safe_load`, refusing a key repeated in a mapping (a yaml.YAMLError naming the key and line)."""
    import yaml

    return yaml.load(text_or_file, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(error) -> str:
    """A YAML error as 'problem at line L, column C' (1-based, as editors count)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def yaml_mapping_for(flag: str):
    """The argparse type of a flag whose value is a YAML/JSON mapping: `--env_kwargs '{size: 4}'`."""

    def mapping(text: str) -> dict:
        import yaml

        try:
            value = safe_load(text) if text.strip() else {}
        except yaml.YAMLError as e:
            raise UsageError(
                f"{flag}={text} is not valid YAML: {yaml_problem(e)}.",
                f"fix: e.g. --{flag} '{{{'size: 2' if flag == 'env_kwargs' else 'key: value'}}}'.",
            ) from e
        if not isinstance(value, dict):
            raise ValueError(text)
        return value

    return mapping  # argparse names the type in its message: "invalid mapping value"


def yaml_mapping_or_text_for(flag: str):
    """The argparse type of a `dict | str` field (TrainingArguments' `lr_scheduler_kwargs`, `deepspeed`, ...): a
    value that starts with `{` is a YAML/JSON mapping (a mistake in it is one line naming the flag), any other is
    text (a file path)."""
    mapping = yaml_mapping_for(flag)

    def mapping_or_text(text: str):
        return mapping(text) if text.lstrip().startswith("{") else text

    return mapping_or_text


def _unquoting(convert):
    """A flag value still wrapped in quotes after the shell (`--save_strategy "'no'"`, as programs that YAML-dump
    their values write) means the quoted text."""

    def parse(text: str):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its messages
    return parse


def _strip_optional(tp):
    args = typing.get_args(tp)
    if (typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _field_types(dataclass_types: Sequence[type]) -> dict[str, Any]:
    out = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        out.update({f.name: _strip_optional(hints.get(f.name, f.type)) for f in dataclasses.fields(cls) if f.init})
    return out


def _parser_class():
    from trl import TrlParser

    class Parser(TrlParser):
        """TrlParser whose argparse errors raise a `UsageError` instead of printing the (very long) usage."""

        def error(self, message):
            match = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: invalid (\w+) value: (.*)", message)
            if match:
                flag, kind, value = match.groups()
                kind = {"int": "an integer", "float": "a number", "mapping": "a YAML mapping like '{a: 1}'"}.get(
                    kind, f"a {kind} value"
                )
                raise UsageError(f"{flag[2:]}={value} is not {kind}.", f"fix: pass {flag} {kind}.")
            match = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: (.*)", message)
            if match:
                raise UsageError(f"{match.group(1)[2:]}: {match.group(2)}")
            raise UsageError(message)

    return Parser


class ConfigParser:
    """Parse `[CONFIG.yaml | --config CONFIG.yaml] [--field value ...]` into dataclasses, with TrlParser.

    `extra_known`: {key: hint} keys that are valid elsewhere (e.g. AEPO fields with `--algo epo`), named in the
    error.
    """

    def __init__(
        self,
        dataclass_types: Sequence[type],
        prog: str,
        extra_known: dict[str, str] | None = None,
    ):
        self.types = list(dataclass_types)
        shared = shared_fields(self.types)
        if shared:  # argparse would refuse the duplicate flag anyway; say which classes collide
            raise UsageError(
                "config keys defined by two dataclasses: "
                + ", ".join(f"{k} ({' and '.join(v)})" for k, v in sorted(shared.items()))
                + ". Each key must route to exactly one config; rename one of them."
            )
        self.prog = prog
        self.extra_known = extra_known or {}
        self.parser = _parser_class()(self.types, prog=prog, allow_abbrev=False)
        self.field_types = _field_types(self.types)
        self._retype_actions()

    def _retype_actions(self) -> None:
        # HfArgumentParser passes a field's type straight to argparse: `dict("{a: 1}")` fails and
        # `tuple[str, str]("ab")` silently splits the string into characters. Fix both.
        for action in self.parser._actions:
            tp = self.field_types.get(action.dest)
            if tp is dict or typing.get_origin(tp) is dict:
                action.type = yaml_mapping_for(action.dest)
            elif str in typing.get_args(tp) and any(dict in (a, typing.get_origin(a)) for a in typing.get_args(tp)):
                action.type = yaml_mapping_or_text_for(action.dest)
            elif typing.get_origin(tp) is tuple and typing.get_origin(action.type) is tuple:
                args = typing.get_args(tp)
                action.type, action.nargs = args[0], len(args)
            if callable(action.type):
                action.type = _unquoting(action.type)

    def _takes_list(self, key: str) -> bool:
        tp = self.field_types.get(key)
        return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))

    @property
    def keys(self) -> list[str]:
        return list(self.field_types)

    def format_help(self) -> str:
        return self.parser.format_help()

    def explicit_keys(self, argv: Sequence[str]) -> set[str]:
        """Field names set by flags in argv."""
        found = set()
        for token in argv:
            if token.startswith("--"):
                action = self.parser._option_string_actions.get(token.split("=", 1)[0])
                if action is not None:
                    found.add(action.dest)
        return found

    def unknown_key_error(self, keys: list[str], where: str) -> UsageError:
        parts = []
        for key in keys:
            if key in self.extra_known:
                parts.append(f"{key!r} ({self.extra_known[key]})")
                continue
            close = difflib.get_close_matches(key, self.keys, n=1, cutoff=0.7)
            parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return UsageError(
            f"unknown key{'s' if len(keys) > 1 else ''} {', '.join(parts)} {where}.",
            f"run `{self.prog} --help` for the valid keys.",
        )

    def check_file_types(self, values: dict[str, Any], path: str) -> None:
        """A YAML value whose type the field cannot take: name it here, not deep inside a config class."""
        for key, value in values.items():
            tp = self.field_types.get(key)
            if tp is None or value is None or isinstance(value, str):
                continue  # strings are typed by the parser like flags
            if isinstance(value, bool) and not (tp is bool or tp is Any or bool in typing.get_args(tp)):
                raise UsageError(
                    f"{key}: {value} in {path} is a YAML boolean (unquoted yes/no/on/off/true/false are).",
                    f'fix: quote it, e.g. {key}: "{"yes" if value else "no"}".',
                )
            if tp is int and isinstance(value, (float, list, dict)) or tp is float and isinstance(value, (list, dict)):
                raise UsageError(f"{key}: {value!r} in {path} is not {'an integer' if tp is int else 'a number'}.")

    def _list_literals(self, argv: Sequence[str]) -> tuple[list[str], dict[str, list]]:
        """List fields also take a YAML flow list, `--report_to []` or `--report_to '[a, b]'` (argparse cannot
        express an empty list)."""
        import yaml

        out, lists, i = [], {}, 0
        while i < len(argv):
            token = argv[i]
            name, eq, inline = token.partition("=")
            action = self.parser._option_string_actions.get(name) if token.startswith("--") else None
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if action is not None and value.startswith("[") and self._takes_list(action.dest):
                try:
                    items = safe_load(value) or []
                except yaml.YAMLError as e:
                    raise UsageError(
                        f"{action.dest}={value} is not valid YAML: {yaml_problem(e)}.",
                        f"fix: a YAML list, e.g. --{action.dest} '[a, b]' or --{action.dest} '[]'.",
                    ) from e
                if not isinstance(items, list):
                    raise UsageError(f"{action.dest}={value}: not a YAML list.", "fix: e.g. '[a, b]' or '[]'.")
                lists[action.dest] = [str(item) for item in items]
                i += 1 if eq else 2
                continue
            out.append(token)
            i += 1
        return out, lists

    def parse(self, argv: Sequence[str], file_values: dict[str, Any], path: str | None) -> tuple[dict, dict]:
        """(values, sources) for every field: file values are parser defaults, flags override them."""
        if file_values:
            self.check_file_types(file_values, path)
            unknown = [k for k in file_values if k not in self.field_types]
            if unknown:
                raise self.unknown_key_error(unknown, f"in {path}")
            self.parser.set_defaults_with_config(**file_values)
        flags, lists = self._list_literals(argv)
        namespace, remaining = self.parser.parse_known_args(flags)
        vars(namespace).update(lists)
        if remaining:
            flags = [t.split("=", 1)[0][2:].replace("-", "_") for t in remaining if t.startswith("--")]
            if flags:
                raise self.unknown_key_error(flags, "on the command line")
            hint = (
                "fix: put the config file first, or pass it as --config FILE."
                if remaining[0].endswith((".yaml", ".yml"))
                else None
            )
            raise UsageError(f"unexpected argument {remaining[0]!r}: options look like --field value.", hint)
        explicit = self.explicit_keys(argv)
        values = {k: v for k, v in vars(namespace).items() if k in self.field_types}
        sources = {k: FLAG if k in explicit else FILE if k in file_values else DEFAULT for k in values}
        return values, sources

    def build(self, values: dict[str, Any], classes: Sequence[type] | None = None) -> list:
        """Instantiate every dataclass (or `classes`, each with the fields of `values` it has) from `values`; a
        validation error names the class and the message."""
        out = []
        for cls in classes or self.types:
            kwargs = {}
            for f in dataclasses.fields(cls):
                if f.init and f.name in values:
                    value = values[f.name]
                    if typing.get_origin(self.field_types[f.name]) is tuple and isinstance(value, list):
                        value = tuple(value)  # YAML and nargs give lists
                    kwargs[f.name] = value
            with user_errors(f"invalid {cls.__name__}"):
                out.append(cls(**kwargs))
        return out


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.isdir(name.split("/")[0])


def check_model_reference(name: str, key: str) -> None:
    """A model given as a local folder must exist; a hub id must be cached when offline. Names without a '/'
    are the CLI's built-in aliases (e.g. builtin-tiny) and are resolved later."""
    if "/" not in name and not name.startswith((".", "~")):
        return
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.exists(config):
            raise UsageError(f"{key}={name!r} is a folder but not a model (no config.json in it).")
        check_json_file(config, f"{key}={name!r}")
        return
    if looks_like_path(name):
        import difflib

        parent = os.path.dirname(os.path.abspath(path))
        siblings = os.listdir(parent) if os.path.isdir(parent) else []
        close = difflib.get_close_matches(os.path.basename(path), siblings, n=1)
        hint = f"did you mean {os.path.join(os.path.dirname(name), close[0])!r}?" if close else "check the path."
        raise UsageError(f"{key}={name!r}: no such model folder.", f"fix: {hint}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise UsageError(
                f"{key}={name!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE=1.",
                f"fix: download it once online (`hf download {name}`), or pass a local model folder.",
            )


def check_json_file(path: str, what: str) -> None:
    """A JSON file a model folder needs (config.json) must parse: one line naming the file and the problem."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise UsageError(f"{what}: {path} cannot be read ({e.strerror or e}).") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{what}: {path} is not valid JSON ({type(e).__name__}: {str(e).splitlines()[0]}).",
            "fix: restore the file (copy the model folder again), or pass another model.",
        ) from e
    if not isinstance(value, dict):
        raise UsageError(f"{what}: {path} is not a JSON object.", "fix: restore the file, or pass another model.")


def split_config_path(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The YAML file (first argument or `--config FILE`) and the remaining flags."""
    argv = list(argv)
    paths = []
    if argv and not argv[0].startswith("-"):
        paths.append(argv.pop(0))
    for i, token in enumerate(argv):
        if token == "--config" or token.startswith("--config="):
            if "=" in token:
                paths.append(token.split("=", 1)[1])
                del argv[i]
            elif i + 1 < len(argv):
                paths.append(argv[i + 1])
                del argv[i : i + 2]
            else:
                raise UsageError("--config needs a YAML file: --config recipe.yaml")
            break
    if len(paths) > 1:
        raise UsageError(f"two config files given ({paths[0]!r} and {paths[1]!r}); pass one.")
    return (shipped_recipe(paths[0]) if paths else None), argv


# The recipes shipped in the package (`epo_trl/recipes`, the checkout's top-level `recipes/` in the wheel).
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipe(path: str) -> str:
    """`path`, or the shipped recipe it names when it does not exist here: `recipes/cpu/demo.yaml` runs from any
    folder after a plain `pip install`, as the docs write it."""
    parts = Path(path).parts
    if os.path.exists(path) or len(parts) < 2 or parts[0] != "recipes":
        return path
    shipped = RECIPES.joinpath(*parts[1:])
    return str(shipped) if shipped.is_file() else path


def read_config_file(path: str | None) -> dict[str, Any]:
    """The YAML mapping in `path` ({} for None); a missing or malformed file is a `UsageError`."""
    if path is None:
        return {}
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} not found.", "fix: check the path (recipes live under recipes/).")
    try:
        with open(path) as f:
            values = safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {yaml_problem(e)}.") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not a text (YAML) file: {e.reason}.") from e
    if values is None:
        raise UsageError(
            f"config file {path!r} is empty.", "fix: write key: value lines, e.g. a copy of recipes/cpu/maze_epo.yaml."
        )
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of key: value at the top level.")
    return values


def flag_value(argv: Sequence[str], key: str) -> str | None:
    """The raw value of `--key value` / `--key=value` in argv (before full parsing), or None."""
    for i, token in enumerate(argv):
        if token == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(f"--{key}="):
            return token.split("=", 1)[1]
    return None
