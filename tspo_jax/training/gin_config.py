"""gin in T5X's conventions: `--gin_file` (repeatable, `include`s resolved on search paths), `--gin.NAME=VALUE`,
`--gin_bindings`, macros and `%gin.REQUIRED`, and the config written next to the checkpoints.

Every binding is checked before any work starts, and a bad one is named with where it came from (file and line,
or the command-line flag):
  - unknown configurables and parameters, and values gin cannot parse (gin's own checks, located);
  - `%gin.REQUIRED` left unset, directly or through a chain of macros;
  - macros used but never defined;
  - literal values whose type contradicts the parameter's annotation (`train.num_steps = 'ten'`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import pathlib
import re
import types
import typing
from collections.abc import Sequence

import gin

# `include 'configs/models/demo.gin'` works from any working directory: the repository root is a search path.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_SEARCH_PATHS = (".", str(REPO_ROOT))


class GinConfigError(ValueError):
    """A gin file or binding is wrong; the message names the binding and where it was written."""


@dataclasses.dataclass(frozen=True)
class Binding:
    """One binding statement and where it came from ("--gin.train.seed" or "--gin_bindings #2")."""

    text: str
    origin: str


@dataclasses.dataclass
class GinFlags:
    files: list[str] = dataclasses.field(default_factory=list)
    bindings: list[Binding] = dataclasses.field(default_factory=list)
    search_paths: list[str] = dataclasses.field(default_factory=list)


def split_gin_flags(argv: Sequence[str]) -> tuple[GinFlags, list[str]]:
    """Takes the gin flags out of `argv`: `--gin_file F` / `--gin_file=F`, `--gin_search_path P`,
    `--gin_bindings 'a.b = 1'` (may hold several lines), and `--gin.NAME=VALUE` (binding `NAME = VALUE`; string
    values need gin quotes, `--gin.RUN_DIR="'/tmp/run'"`). Returns the rest of argv untouched."""
    flags, rest = GinFlags(), []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--gin_file", "--gin_search_path", "--gin_bindings", "--gin_param"):
            if not eq:
                if i + 1 >= len(args):
                    raise GinConfigError(f"{name} needs a value")
                i += 1
                value = args[i]
            if name == "--gin_file":
                flags.files.append(value)
            elif name == "--gin_search_path":
                flags.search_paths.append(value)
            else:
                number = sum(b.origin.startswith(name) for b in flags.bindings) + 1
                flags.bindings.append(Binding(value, f"{name} #{number}"))
        elif arg.startswith("--gin."):
            key = name[len("--gin."):]
            if not eq or not key:
                raise GinConfigError(f"{arg!r}: expected --gin.NAME=VALUE")
            flags.bindings.append(Binding(f"{key} = {value}", f"--gin.{key}"))
        else:
            rest.append(arg)
        i += 1
    return flags, rest


def load(flags: GinFlags, defaults: Sequence[Binding] = ()) -> list[pathlib.Path]:
    """Clears gin, parses every file, then `defaults` (bindings a tool supplies, e.g. the fit check's stand-ins
    for paths it never reads), then every flag binding; validates all of them and locks the config.

    Returns the top-level config files, resolved.
    """
    gin.clear_config(clear_constants=False)
    for prefix in [*DEFAULT_SEARCH_PATHS, *flags.search_paths]:
        if prefix not in gin.config._LOCATION_PREFIXES:  # gin has no public "is registered" query
            gin.add_config_file_search_path(prefix)
    if not flags.files:
        raise GinConfigError("no --gin_file given (e.g. --gin_file=configs/experiments/tiny_cpu.gin)")
    read: list[pathlib.Path] = []
    for config_file in flags.files:
        try:
            gin.parse_config_file(config_file)
        except (ValueError, IOError, SyntaxError) as e:
            raise GinConfigError(f"in --gin_file={config_file}: {e}") from None
        read.append(_resolve(config_file))
    for binding in [*defaults, *flags.bindings]:
        try:
            gin.parse_config(binding.text)
        except (ValueError, SyntaxError) as e:
            hint = ""
            if "Failed to parse token" in str(e) or "Unable to parse value" in str(e):
                hint = "\n  (gin strings are quoted: --gin.RUN_DIR=\"'/tmp/run'\")"
            raise GinConfigError(f"in {binding.origin} ({binding.text.strip()!r}): {e}{hint}") from None
    _validate(read, [*defaults, *flags.bindings])
    try:
        gin.finalize()
    except ValueError as e:
        raise GinConfigError(str(e)) from None
    return read


def build(flags: GinFlags, make, defaults: Sequence[Binding] = ()) -> object:
    """Loads `flags` (`load`) and calls `make` (which builds from gin configurables: an experiment, or what an
    evaluation needs), so a value their checks refuse fails as a GinConfigError naming the binding, like a gin
    error would. defaults: as `load`'s."""
    load(flags, defaults)
    try:
        return make()
    except (ValueError, TypeError) as error:
        raise GinConfigError(f"bad configuration: {error}") from None


def _resolve(config_file: str) -> pathlib.Path:
    if os.path.isabs(config_file):
        return pathlib.Path(config_file)
    for prefix in gin.config._LOCATION_PREFIXES:
        candidate = pathlib.Path(prefix, config_file)
        if candidate.exists():
            return candidate.resolve()
    return pathlib.Path(config_file)


# ----- validation -----------------------------------------------------------------------------------------------
def _binding_name(scope: str, selector: str, param: str) -> str:
    if selector == "gin.macro":
        return scope  # a macro's name is its scope
    short = selector.rsplit(".", 1)[-1]
    return f"{scope}/{short}.{param}" if scope else f"{short}.{param}"


_INCLUDE = re.compile(r"""^\s*include\s+['"](.+)['"]""")


def _statements(files: Sequence[pathlib.Path]) -> list[tuple[pathlib.Path, int, str]]:
    """Every line of the top-level files with includes expanded in place: the order gin applies them."""
    out: list[tuple[pathlib.Path, int, str]] = []

    def expand(path: pathlib.Path, depth: int) -> None:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return
        for number, line in enumerate(lines, start=1):
            include = _INCLUDE.match(line)
            if include and depth < 32:
                expand(_resolve(include.group(1)), depth + 1)
            else:
                out.append((path, number, line))

    for path in files:
        expand(path, 0)
    return out


def _where(name: str, files: Sequence[pathlib.Path], bindings: Sequence[Binding]) -> str:
    """Where `name = …` was last written: the flag, or the file and line."""
    pattern = re.compile(rf"^\s*(?:[\w./]*/)?(?:[\w.]*\.)?{re.escape(name)}\s*=")
    for binding in reversed(bindings):
        if any(pattern.match(line) for line in binding.text.splitlines()):
            return binding.origin
    for path, number, line in reversed(_statements(files)):
        if pattern.match(line):
            return f'file "{path}", line {number}'
    return "the gin config"


def _macro_chain(reference, config) -> tuple[list[str], object]:
    """Follows `%A` -> `A = %B` -> … ; returns the macro names and the final value (or the REQUIRED marker)."""
    chain = []
    value = reference
    while isinstance(value, gin.config.ConfigurableReference):
        if value.configurable.wrapped is gin.config._retrieve_constant:
            return chain, value.scoped_configurable_fn()
        if value.configurable.wrapped is not gin.config.macro:
            return chain, value
        name = "/".join(value.scopes)
        if name in chain:
            raise GinConfigError(f"macro cycle: {' -> '.join(chain + [name])}")
        chain.append(name)
        bound = config.get((name, "gin.macro"))
        if bound is None or "value" not in bound:
            return chain, _UNDEFINED
        value = bound["value"]
    return chain, value


_UNDEFINED = object()


def _validate(files: Sequence[pathlib.Path], bindings: Sequence[Binding]) -> None:
    config = gin.config._CONFIG  # gin offers no public iterator over parsed bindings
    problems = []
    required: dict[str, list[str]] = {}  # the name holding %gin.REQUIRED -> bindings that depend on it
    for (scope, selector), params in config.items():
        configurable = gin.config._REGISTRY.get_match(selector) if selector != "gin.macro" else None
        hints = _type_hints(configurable.wrapped) if configurable else {}
        for param, value in params.items():
            name = _binding_name(scope, selector, param)
            for leaf in gin.config._iterate_flattened_values(value):
                if isinstance(leaf, gin.config.ConfigurableReference) and leaf.configurable.wrapped in (
                    gin.config.macro, gin.config._retrieve_constant
                ):
                    chain, final = _macro_chain(leaf, config)
                    if final is gin.REQUIRED:
                        users = required.setdefault(chain[-1] if chain else name, [])
                        if chain:
                            users.append(name)
                    elif final is _UNDEFINED:
                        problems.append(f"{name} uses the macro %{chain[-1]}, which is never defined "
                                        f"[{_where(name, files, bindings)}]")
            if param in hints and not isinstance(value, gin.config.ConfigurableReference):
                error = _type_error(value, hints[param])
                if error:
                    problems.append(f"{name} = {value!r}: {error} [{_where(name, files, bindings)}]")
    for name, users in required.items():
        used_by = f" (used by {', '.join(sorted(set(users)))})" if users else ""
        problems.append(f"{name} is %gin.REQUIRED and never set{used_by}; set it with --gin.{name}=VALUE "
                        f"[{_where(name, files, bindings)}]")
    if problems:
        raise GinConfigError("bad gin binding(s):\n  " + "\n  ".join(dict.fromkeys(problems)))


def _type_hints(fn) -> dict[str, object]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations in a third-party signature: nothing to check against
        return {}


def _type_error(value, hint) -> str | None:
    """Why `value` (a parsed gin literal) cannot be `hint`, or None when it fits (or we cannot tell)."""
    if isinstance(value, gin.config.ConfigurableReference) or hint is typing.Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = [_type_error(value, arg) for arg in args]
        return None if any(e is None for e in errors) else f"expected {_hint_name(hint)}"
    if origin is typing.Literal:
        return None if value in args else f"expected one of {list(args)}"
    if hint is type(None):
        return None if value is None else "expected None"
    if hint is bool:
        return None if isinstance(value, bool) else "expected True or False"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an int"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "expected a number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string (gin strings are quoted: 'text')"
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "expected a sequence, e.g. ['a', 'b']"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return f"expected {len(args)} items"
            errors = [_type_error(v, a) for v, a in zip(value, args)]
        else:
            errors = [_type_error(v, args[0]) for v in value] if args else []
        bad = next((e for e in errors if e), None)
        return f"an item: {bad}" if bad else None
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return None if isinstance(value, dict) else "expected a dict"
    return None


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# ----- records --------------------------------------------------------------------------------------------------
def write_config(run_dir: str | os.PathLike, *, operative: bool = False):
    """Writes `config.gin` (every binding, at start-up) or `operative_config.gin` (the values actually used,
    after the first step) into the run directory (local or gs://), T5X-style. Returns its epath."""
    from etils import epath

    path = epath.Path(run_dir) / ("operative_config.gin" if operative else "config.gin")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = gin.operative_config_str() if operative else gin.config_str()
    path.write_text(text)
    return path


def run_config(run_dir, scratch: pathlib.Path, *, names: Sequence[str] = ("operative_config.gin", "config.gin")
               ) -> pathlib.Path:
    """The first of `names` that run directory `run_dir` (an epath, local or gs://) holds, as a local file: itself,
    or (gs://) a copy in `scratch`, since gin parses local files only. Raises FileNotFoundError naming the run
    directory when it has none."""
    for name in names:
        path = run_dir / name
        if path.is_file():
            if "://" not in os.fspath(path):
                return pathlib.Path(os.fspath(path))
            local = pathlib.Path(scratch) / name
            local.write_text(path.read_text())
            return local
    raise FileNotFoundError(f"{run_dir} has no {' or '.join(names)}: is it a training run directory?")


def run_kind(config_text: str) -> str:
    """The configurable a run directory's config builds: "sft" for a supervised warm start (it binds `sft.*`),
    else "train" (an RL run)."""
    return "sft" if re.search(r"^sft\.", config_text, re.MULTILINE) else "train"
