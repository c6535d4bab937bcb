"""The thin CLI layer shared by every command: a dataclass config becomes argparse flags, and
user errors become one line on stderr with exit code 2 (DESIGN.md, section 4)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")
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


def build_parser(config_cls: type, description: str, positional: Sequence[str] = ()) -> argparse.ArgumentParser:
    """argparse parser with one flag per dataclass field; the field's metadata['help'] is its help."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
        required = default is dataclasses.MISSING
        name = field.name if field.name in positional else _flag(field.name)
        kwargs: dict[str, Any] = {"help": help_text}
        if field.name not in positional:
            kwargs["dest"] = field.name
            if required:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (list, tuple):
            kwargs["nargs"] = "+" if required else "*"
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
                 positional: Sequence[str] = ()) -> T:
    """Parse argv into an instance of `config_cls` (unknown flags are usage errors, exit 2)."""
    parser = build_parser(config_cls, description, positional)
    namespace = parser.parse_args(argv)
    return config_cls(**vars(namespace))


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
        elif isinstance(value, bool):
            args.append(_flag(f.name) if value else "--no-" + _flag(f.name)[2:])
        elif isinstance(value, list | tuple):
            args += [_flag(f.name), *map(str, value)]
        else:
            args += [_flag(f.name), str(value)]
    return args


def field(default: Any = dataclasses.MISSING, help: str = "", choices: Sequence[str] | None = None,
          **kwargs: Any) -> Any:
    """dataclasses.field with the help text (and choices) the CLI shows."""
    meta = {"help": help, "choices": choices}
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
    try:
        with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
    except OSError as err:
        if path.is_file():
            path.unlink(missing_ok=True)
        raise InputError(path, f"cannot write ({err.strerror or err})") from None


def make_dir(path: str | Path) -> Path:
    """Create an output directory the user named (and its parents); a one-line error if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(path, f"cannot create the directory ({err.strerror or err})") from None
    return path


def run(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: InputError -> one line on stderr and exit 2, no traceback; so is
    an OSError about a file (a missing, unreadable or unwritable path) that got this far."""
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
    sys.exit(code or 0)
