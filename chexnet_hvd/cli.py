"""The thin CLI layer shared by every command: a dataclass config becomes argparse flags (and
`--config FILE`, the same settings from a TOML or JSON file, which flags override), each numeric
flag's range lives beside its field (`field(minimum=...)`) and is checked for every CLI when it
parses, and user errors become one line on stderr with exit code 2 (DESIGN.md, section 4)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import operator
import os
import re
import shutil
import sys
import tomllib
import typing
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, requeue me


class InputError(Exception):
    """Bad input from the user: reported as `error: <where>: <what>`, exit code 2."""

    def __init__(self, where: object, what: str):
        super().__init__(f"{where}: {what}")
        self.where, self.what = str(where), what

    def __reduce__(self):  # pickled whole: the trainer's chief hands its errors to the other ranks
        return InputError, (self.where, self.what)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def watched() -> bool:
    """Whether a person watches stdout (a terminal) rather than a batch log. Open MPI's launcher
    (mpirun; horovodrun over MPI) gives every rank a pseudo-terminal wherever its own output
    goes, a file or a pipe included: a rank it started cannot tell, and writes as to a log."""
    return sys.stdout.isatty() and "OMPI_COMM_WORLD_SIZE" not in os.environ  # engine.LAUNCHER_SIZES' mpirun


def error_text(err: BaseException, limit: int | None = 200) -> str:
    """An exception's first line, without the '{{function_node ...}} ' TensorFlow puts first;
    for TF's "Graph execution error:", the first line of the reason after the node's stack."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if lines[0].startswith("Graph execution error"):
        lines = [line for line in lines[1:] if not line.startswith((" ", "\t", "Detected at node", "Node: "))] or lines
    return re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", lines[0])[:limit]


def read_settings(config_cls: type, path: str | Path) -> dict:
    """A settings file for `config_cls`: a TOML table or a JSON object (by the suffix .toml or
    .json; else whichever parses) whose keys are the dataclass' fields. Unknown keys and values
    of the wrong type are one-line errors naming the file and every offender."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(path, f"cannot read the settings file ({err.strerror or err})") from None
    loaders = {".toml": [tomllib.loads], ".json": [json.loads]}.get(path.suffix, [json.loads, tomllib.loads])
    for load in loaders:
        try:
            settings = load(text)
            break
        except (ValueError, tomllib.TOMLDecodeError) as err:
            problem = str(err)
    else:
        raise InputError(path, f"not a TOML or JSON settings file ({problem})")
    if not isinstance(settings, dict):
        raise InputError(path, "settings must be a table of key = value (a JSON object)")
    hints = typing.get_type_hints(config_cls)
    unknown = sorted(set(settings) - set(hints))
    if unknown:
        raise InputError(path, f"unknown settings {', '.join(unknown)} (the keys are this command's "
                         "flags, - written as _)")
    wrong = [f"{key} = {value!r} is not {type_name(hints[key])}" for key, value in settings.items()
             if not of_type(value, hints[key])]
    if wrong:
        raise InputError(path, "; ".join(wrong))
    return settings


def of_type(value: Any, kind: Any) -> bool:
    """Whether a settings file's `value` fits a field of type `kind` (an int is a float; a bool
    is not an int)."""
    if typing.get_origin(kind) in (list, tuple):
        return isinstance(value, list) and all(of_type(v, typing.get_args(kind)[0]) for v in value)
    options = [a for a in typing.get_args(kind) if a is not type(None)]  # X | None
    if options:
        return value is None or of_type(value, options[0])
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def type_name(kind: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if typing.get_origin(kind) in (list, tuple):
        return f"a list of {type_name(typing.get_args(kind)[0]).removeprefix('a ')}s"
    return names.get(kind, str(kind))


def settings_file(argv: Sequence[str]) -> str | None:
    """The value of the last --config in argv, if any, abbreviated as argparse allows (`--conf
    FILE`: a prefix shared with another flag is argparse's "ambiguous option" error anyway)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--":  # what follows is positional
            break
        name, eq, value = arg.partition("=")
        if len(name) > 2 and "--config".startswith(name):
            found = value if eq else argv[i + 1] if i + 1 < len(argv) else None
    return found


class Parser(argparse.ArgumentParser):
    """argparse with the suite's error convention: a usage error is one line, `error: <flag>:
    <what>`, and exit code 2 (argparse printed its usage block and `prog: error: ...`)."""

    def error(self, message: str) -> typing.NoReturn:
        where, _, what = message.partition(": ")
        if where.startswith("argument ") and what:  # "argument --lr: invalid float value: 'x'"
            where = where[len("argument "):]
        else:  # "unrecognized arguments: ...", "the following arguments are required: ..."
            where, what = self.prog, message
        self.exit(EXIT_USAGE, f"error: {where}: {what} (see {self.prog} --help)\n")


def summary(doc: str) -> str:
    """A docstring's first paragraph on one line: a CLI's --help description, in whole sentences."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def build_parser(config_cls: type, description: str, positional: Sequence[str] = (),
                 prog: str | None = None, given: dict | None = None) -> argparse.ArgumentParser:
    """argparse parser with one flag per dataclass field (the field's metadata['help'] is its
    help) and --config; fields `given` (by a settings file) default to those values and are no
    longer required. `description`: a docstring, of which --help shows the first paragraph;
    `prog`: how the usage line starts the command (`python -m chexnet_hvd.train`, not `train.py`)."""
    given = given or {}
    parser = Parser(prog=prog, description=summary(description),
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="settings from a TOML or JSON file whose "
                        "keys are these flags (- written as _); flags given here override it")
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind = hints[field.name]
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        default = (
            field.default_factory()  # type: ignore[misc]
            if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        default = given.get(field.name, default)
        required = default is dataclasses.MISSING
        name = field.name if field.name in positional else _flag(field.name)
        kwargs: dict[str, Any] = {"help": help_text}
        if field.name not in positional:
            kwargs["dest"] = field.name
            if required:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        elif not required:  # a positional the settings file gave
            kwargs["default"] = default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (list, tuple):
            kwargs["nargs"] = "+" if required else "*"
            if field.name in positional and field.name in given:
                kwargs["nargs"] = "*"
            kwargs["type"] = typing.get_args(kind)[0]
            if choices:
                kwargs["choices"] = choices
        else:
            base = [a for a in typing.get_args(kind) if a is not type(None)]
            kwargs["type"] = base[0] if base else kind
            if choices:
                kwargs["choices"] = choices
        parser.add_argument(name, **kwargs)
    return parser


def parse_config(config_cls: type[T], description: str, argv: Sequence[str] | None = None,
                 positional: Sequence[str] = (), prog: str | None = None) -> T:
    """Parse argv (and the --config file it names) into an instance of `config_cls` (unknown
    flags are usage errors, exit 2), every field within its range and choices (`check_values`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = settings_file(argv)
    parser = build_parser(config_cls, description, positional, prog,
                          read_settings(config_cls, path) if path else None)
    return from_namespace(config_cls, parser.parse_args(argv))


def from_namespace(config_cls: type[T], namespace: argparse.Namespace) -> T:
    """The config of a parsed namespace (--config itself left out: its settings are in), every
    field within its range and choices (`check_values`: a settings file's values too)."""
    values = vars(namespace)
    values.pop("config", None)
    return check_values(config_cls(**values))


# A numeric field's range, in its metadata (JSON Schema's words): inclusive minimum / maximum,
# or exclusive ones (a learning rate above 0).
RANGE_KEYS = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")
_RANGE_WORDS = {"minimum": "at least", "maximum": "at most", "exclusive_minimum": "more than",
                "exclusive_maximum": "less than"}
_RANGE_OK = {"minimum": operator.ge, "maximum": operator.le, "exclusive_minimum": operator.gt,
             "exclusive_maximum": operator.lt}


def range_of(field: dataclasses.Field) -> dict:
    """The bounds a field's metadata sets ({} for none)."""
    return {key: field.metadata[key] for key in RANGE_KEYS if field.metadata.get(key) is not None}


def describe_range(bounds: dict) -> str:
    """e.g. 'at least 1', 'more than 0 and less than 1'."""
    return " and ".join(f"{_RANGE_WORDS[key]} {value}" for key, value in bounds.items())


def check_values(config: T) -> T:
    """`config` itself when every field (every element of a list field) is one of its choices,
    and every number is finite and within the range its metadata sets; else a one-line
    InputError naming the flag. argparse checks a flag's choices, not a default's: a settings
    file's values arrive as defaults, so they are checked here."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        bounds, choices = range_of(f), f.metadata.get("choices")
        value = getattr(config, f.name)
        for item in value if isinstance(value, list | tuple) else [value]:
            if choices and item not in choices:
                env = f.metadata.get("env")
                source = f" (from {env})" if env and os.environ.get(env) == item else ""
                raise InputError(_flag(f.name), f"{item!r}{source} is not one of {', '.join(map(repr, choices))}")
            # argparse's float() takes "inf" and "nan"; no flag means either (0 turns a limit off)
            if isinstance(item, float) and not math.isfinite(item):
                raise InputError(_flag(f.name), f"must be a finite number, not {item}")
            if item is None or isinstance(item, bool) or not bounds:
                continue
            if not all(_RANGE_OK[key](item, bound) for key, bound in bounds.items()):
                raise InputError(_flag(f.name), f"must be {describe_range(bounds)}, not {item}")
    return config


def to_argv(config: Any, positional: Sequence[str] = (), defaults: dict | None = None) -> list[str]:
    """The command-line arguments `parse_config` (with the same `defaults`) turns back into
    `config`: every field without a default, and every field whose value differs from it."""
    args: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                   else f.default)
        default = (defaults or {}).get(f.name, default)
        if default is not dataclasses.MISSING and value == default:
            continue
        if f.name in positional:
            args += list(map(str, value)) if isinstance(value, list | tuple) else [str(value)]
        else:
            args += field_argv(f.name, value)
    return args


def field_argv(name: str, value: Any) -> list[str]:
    """The arguments that set field `name` to `value`: `--crop`, `--no-augment`, `--epochs 20`."""
    if isinstance(value, bool):
        return [_flag(name) if value else "--no-" + _flag(name)[2:]]
    return [_flag(name), *map(str, value if isinstance(value, list | tuple) else [value])]


def field(default: Any = dataclasses.MISSING, help: str = "", choices: Sequence | None = None,
          minimum: float | None = None, maximum: float | None = None,
          exclusive_minimum: float | None = None, exclusive_maximum: float | None = None,
          env: str | None = None, **kwargs: Any) -> Any:
    """dataclasses.field with the help text (and choices) the CLI shows and, for a number, its
    range (inclusive minimum / maximum, or exclusive ones), which parsing checks; `env`: the
    environment variable its default comes from (named when its value is refused)."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
            "exclusive_minimum": exclusive_minimum, "exclusive_maximum": exclusive_maximum, "env": env}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]], align: str = "---:") -> str:
    """A Markdown table (the reports print these); `align` is the separator of columns 2..n."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|---|" + f"{align}|" * (len(head) - 1)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def output(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a file the user named for writing. When writing fails (no such folder, a full disk,
    /dev/full) the error names the file, and a partly written regular file is removed: nothing
    half-written is left looking complete."""
    path = Path(path)
    with writing(path, path, "this file"), open(
            path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
        yield fh


@contextlib.contextmanager
def writing(partial: Path, final: Path, what: str, errors: tuple[type[BaseException], ...] = (OSError,)):
    """Writing `final` by way of `partial` (a temporary file or folder, renamed into place once
    complete; or `final` itself): a failure among `errors` (a full disk, a quota, a permission)
    removes `partial` when it is a regular file or a folder (never a device such as /dev/full),
    so that it holds no space the next attempt needs, and is one line naming `final`."""
    try:
        yield
    except errors as err:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.is_file():
            partial.unlink(missing_ok=True)
        why = err.strerror if isinstance(err, OSError) and err.strerror else error_text(err, limit=None)
        why = why.rsplit("; ", 1)[-1].split(" [Op:")[0]  # TensorFlow's: "FILE; REASON [Op:SaveV2]"
        raise InputError(final, f"cannot write {what}: {why}") from None


def make_dir(path: str | Path) -> Path:
    """Create an output directory the user named (and its parents); a one-line error if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(path, f"cannot create the directory ({err.strerror or err})") from None
    return path


def run(main: Callable[[], int | None], leave: Collection[int] = ()) -> None:
    """Run a CLI entry point: InputError -> one line on stderr and exit 2, no traceback; so is
    an OSError about a file (a missing, unreadable or unwritable path) that got this far.
    An exit code in `leave` ends the process at once, without the interpreter's teardown: for
    exits whose state is already on disk (a checkpoint, the run log's end), since tearing down
    TensorFlow and the engine can outlast a launcher's patience (horovodrun kills its ranks 5 s
    after passing on a SIGTERM) or hang on a collective whose peer is gone."""
    try:
        code = main()
    except InputError as err:
        print(f"error: {err.where}: {err.what}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as err:
        print(f"error: {err.filename or 'a file'}: {err.strerror or err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    if code in leave:
        with contextlib.suppress(OSError):  # a launcher's pipe already gone: still exit `code`
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code or 0)
