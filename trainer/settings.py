"""Stage configs declared once: dataclass fields that carry their type, default, bounds, choices and help.

A config is a dataclass whose fields are made with `setting(...)`. From that one declaration come
the command-line flags (`add_flags`), the conversion and checks of a `--config` YAML value
(`Declared.from_file`, `Declared.problem`: the flag's own rules), the instance the parsed flags
describe (`from_args`) and the checks with their messages (`check_settings`). Every refusal is a
ConfigError naming the setting by its key, which is also its YAML key; its flag is `--key`.

It lives in trainer, the leftmost package with a stage config (TrainConfig), so that trainer, eval
and pipeline can all declare theirs with it; `cache` is the storage format and has no settings. It
imports nothing but the standard library, so that `lkspec --help` stays instant.
"""
from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

SETTING = "lkspec.setting"  # the metadata entry of a declared field


class ConfigError(ValueError):
    """A setting is invalid; `key` names it (None when the message names what it is about itself)."""

    def __init__(self, problem: str, *, key: str | None = None):
        super().__init__(f"{key} {problem}" if key else problem)
        self.key, self.problem = key, problem

    def flag_message(self) -> str:
        """The message with the setting named by its command-line flag (`--batch-tokens must be ...`)."""
        return f"{flag(self.key)} {self.problem}" if self.key else self.problem


def flag(key: str) -> str:
    """The command-line flag of a setting key (`batch_tokens` -> `--batch-tokens`)."""
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class Setting:
    """How a field is spelled, shown, parsed and checked; see `setting`."""

    help: str
    key: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    group: str | None = None
    cli: bool = True
    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    auto: bool = False
    distinct: bool | Callable[[Any], Any] = False
    check: Callable[[Any], bool] | None = None
    expected: str | None = None
    parse: Callable[[str], Any] | None = None


def setting(default: Any = MISSING, *, help: str, **declared: Any) -> Any:
    """A dataclass field with its declaration (no default: a required flag).

    key: the YAML key and flag name (default: the field's name); aliases: more flags; metavar, group
    (an argparse group title); cli=False: no flag. Checks: choices; bounds ge/gt/le/lt; auto=True
    also accepts the word "auto"; distinct (True, or a function giving what must differ) for
    lists; check(value) -> bool; expected: what the error says a valid value is, where the bounds
    alone would say it otherwise. parse(text): how a flag's text becomes the value (lists: split at
    commas and convert each item). A list or tuple field's bounds, choices and check apply to each
    item; it may be empty only if its default is.
    """
    meta = {SETTING: Setting(help=help, **declared)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def preset(**defaults: Any) -> Callable[[type], type]:
    """Class decorator, under @dataclass: the subclass keeps its bases' declared fields with new defaults."""

    def apply(cls: type) -> type:
        inherited = {f.name: f for f in fields(cls)}
        if "__annotations__" not in cls.__dict__:
            cls.__annotations__ = {}
        for name, value in defaults.items():
            base = inherited[name]
            cls.__annotations__[name] = base.type
            setattr(cls, name, setting(value, **_declared(base.metadata[SETTING])))
        return cls

    return apply


def _declared(declaration: Setting) -> dict:
    return {f.name: getattr(declaration, f.name) for f in fields(declaration)}


# ---------------------------------------------------------------- the shape of a field's value
@dataclass(frozen=True)
class _Shape:
    kind: type  # int, float, str, bool, Path, dict, or the item type of a list / tuple
    container: type | None = None  # list or tuple
    optional: bool = False  # None is allowed


def _shape(hint: Any) -> _Shape:
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        members = [a for a in members if a is not str] if len(members) > 1 else members  # int | str: "auto" or int
        hint = members[0]
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return _Shape(typing.get_args(hint)[0], origin, optional)
    return _Shape(origin or hint, None, optional)


@dataclass(frozen=True)
class Declared:
    """One declared field of a config class: its name, declaration, value shape and default."""

    name: str
    setting: Setting
    shape: _Shape
    default: Any  # MISSING: required

    @property
    def key(self) -> str:
        """Its name for the user: the YAML key, and the flag with dashes."""
        return self.setting.key or self.name

    @property
    def switch(self) -> bool:
        """A true/false setting: a flag without a value."""
        return self.shape.kind is bool and self.shape.container is None

    @property
    def negated(self) -> bool:
        """A switch that is on by default: its flag (and YAML key) is no-KEY, which turns it off."""
        return self.switch and self.default is True

    @property
    def may_be_empty(self) -> bool:
        """A list that may be empty: one whose default is."""
        return isinstance(self.default, (list, tuple)) and not self.default

    @property
    def dest(self) -> str:
        """Its attribute in the parsed arguments, and its YAML key."""
        return f"no_{self.key}" if self.negated else self.key

    def from_text(self, text: str) -> Any:
        """The value a flag's text stands for (ConfigError naming the key otherwise)."""
        declaration, shape = self.setting, self.shape
        try:
            if declaration.parse is not None:
                return declaration.parse(text)
            if shape.container is not None:
                items = [item.strip() for item in text.split(",") if item.strip()]
                try:
                    return shape.container(shape.kind(item) for item in items)
                except ValueError:
                    raise ConfigError(f"expects a comma-separated list of {shape.kind.__name__}, got {text!r}",
                                      key=self.key) from None
            if declaration.auto and text == "auto":
                return text
            return shape.kind(text)
        except ConfigError:
            raise
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(str(exc)) from exc

    def from_file(self, value: Any) -> Any:
        """A YAML value converted like the flag's text (a list may also be a YAML list)."""
        if value is None and (self.shape.optional or self.default is None):
            return None
        if self.switch:
            return value  # problem() says whether it is true or false
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        return self.from_text(str(value))

    def problem(self, value: Any) -> str | None:
        """Why `value` breaks the declaration ("must be ..., got ..."), or None."""
        shape = self.shape
        if value is None and shape.optional:
            return None
        if shape.container is None:
            return None if self._valid(value) else f"must be {self.expected()}, got {value!r}"
        if not isinstance(value, (list, tuple)) or (not value and not self.may_be_empty):
            return f"must be {self.expected()}, got {_joined(value)!r}"
        for item in value:
            if not self._valid(item):
                return f"must be {self.expected()}, got {item!r}"
        distinct = self.setting.distinct
        if distinct:
            keys = [distinct(item) for item in value] if callable(distinct) else list(value)
            if len(set(keys)) < len(keys):
                return f"must be {self.expected()}, got {_joined(value)!r}"
        return None

    def _valid(self, value: Any) -> bool:
        declaration, kind = self.setting, self.shape.kind
        if declaration.auto and value == "auto":
            return True
        if kind is bool:
            return isinstance(value, bool)
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is Path:
            ok = isinstance(value, (str, Path)) and str(value) != ""
        elif kind is str:
            ok = isinstance(value, str) and value != ""
        else:
            ok = isinstance(value, kind)
        if ok and declaration.choices is not None:
            ok = value in declaration.choices
        if ok and kind in (int, float):
            ok = _within(value, declaration)
        if ok and declaration.check is not None:
            ok = bool(declaration.check(value))
        return ok

    def expected(self) -> str:
        """What a valid value is, in words (`an integer >= 1`, `distinct integers >= 0`, `one of a, b`)."""
        declaration, kind = self.setting, self.shape.kind
        if declaration.expected is not None:
            return declaration.expected
        many = self.shape.container is not None
        if declaration.choices is not None:
            listed = ", ".join(map(str, declaration.choices))
            words = f"values from {listed}" if many else f"one of {listed}"
        elif kind in (int, float):
            words = _number_words(kind, declaration, many)
        elif kind is bool:
            words = "true or false"
        else:
            words = "non-empty strings" if many else "a non-empty string"
        if many and declaration.distinct:
            words = f"distinct {words}"
        return f"auto or {words}" if declaration.auto else words


def _within(value: float, declaration: Setting) -> bool:
    return ((declaration.ge is None or value >= declaration.ge) and (declaration.gt is None or value > declaration.gt)
            and (declaration.le is None or value <= declaration.le)
            and (declaration.lt is None or value < declaration.lt))


def _number_words(kind: type, declaration: Setting, many: bool) -> str:
    low = (">=", declaration.ge) if declaration.ge is not None else (">", declaration.gt)
    high = ("<=", declaration.le) if declaration.le is not None else ("<", declaration.lt)
    if kind is float and low[1] is not None and high[1] is not None:  # an interval: (0, 0.5]
        return ("numbers in " if many else "a number in ") + (
            f"{'[' if low[0] == '>=' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == '<=' else ')'}")
    noun = ("integers" if many else "an integer") if kind is int else ("numbers" if many else "a finite number")
    bounds = [f"{op} {bound:g}" for op, bound in (low, high) if bound is not None]
    return " ".join([noun, " and ".join(bounds)]).strip()


def _joined(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- a config class's declarations
def declared(cls: type) -> list[Declared]:
    """The declared fields of a config class, in field order."""
    hints = typing.get_type_hints(cls)
    return [Declared(f.name, f.metadata[SETTING], _shape(hints[f.name]), _default(f))
            for f in fields(cls) if SETTING in f.metadata]


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def check_settings(config: Any) -> None:
    """Raise ConfigError naming the first declared field of `config` whose value breaks its declaration."""
    for item in declared(type(config)):
        problem = item.problem(getattr(config, item.name))
        if problem is not None:
            raise ConfigError(problem, key=item.key)


# ---------------------------------------------------------------- command line
def add_flags(parser: argparse.ArgumentParser, cls: type, *, presets: dict[str, dict] | None = None) -> None:
    """Add a flag for every declared field of `cls` (in its group, if it names one).

    With `presets` (name -> field values), every flag defaults to None, "the preset's value", and its
    help shows the class default and each preset's own value.
    """
    for item in declared(cls):
        declaration = item.setting
        if not declaration.cli:
            continue
        target = parser if declaration.group is None else flag_group(parser, declaration.group)
        default = None if presets is not None or item.default is MISSING else item.default
        options: dict[str, Any] = dict(dest=item.dest, default=default, help=_help(item, presets))
        names = [flag(item.dest)] if item.negated else [flag(item.key), *declaration.aliases]
        if item.switch:
            options.update(action="store_true", default=None if presets is not None else False)
        elif item.shape.container is not None or item.shape.kind is dict:
            # converted as the flag is read: a bad value is a ConfigError naming the flag, not an argparse exit
            options.update(action=_ConvertAction, metavar=declaration.metavar, required=item.default is MISSING)
        else:
            options.update(type=_argparse_type(item), choices=declaration.choices, metavar=declaration.metavar,
                           required=item.default is MISSING)
        target.add_argument(*names, **options).declared = item


def flag_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's argument group of that title (made on first use)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


class _ConvertAction(argparse.Action):
    """Stores a flag's value converted by its declaration."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.declared.from_text(values))


def _argparse_type(item: Declared) -> Callable[[str], Any]:
    """argparse's `type` for a scalar flag: the plain type; with auto or parse, a converter checked on the spot."""
    if not (item.setting.auto or item.setting.parse):
        return item.shape.kind

    def convert(text: str) -> Any:
        try:
            value = item.from_text(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None
        problem = item.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"expected {item.expected()}, got {text!r}")
        return value

    return convert


def _help(item: Declared, presets: dict[str, dict] | None) -> str:
    text = item.setting.help
    if "default" in text or item.switch:
        return text
    shown = [_shown(item.default)] if _meaningful(item.default) else []
    shown += [f"{name}: {_shown(values[item.name])}" for name, values in (presets or {}).items() if item.name in values]
    return f"{text} (default: {'; '.join(shown)})" if shown else text


def _meaningful(default: Any) -> bool:
    return default is not MISSING and default is not None and default != "" and not (
        isinstance(default, (list, tuple, dict)) and not default)


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(item) for item in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def from_args(cls: type, args: argparse.Namespace, *, preset: dict | None = None) -> Any:
    """The validated `cls` the parsed flags describe, over `preset` (if any) where a flag was not given."""
    given = {}
    for item in declared(cls):
        if not item.setting.cli:
            continue
        value = getattr(args, item.dest)
        if item.negated and value is not None:
            value = not value
        if value is not None or preset is None:
            given[item.name] = value
    config = cls(**{**(preset or {}), **given})
    config.validate()
    return config
