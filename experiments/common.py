"""Plumbing shared by the experiment packages: recipes, flags, result files.

A recipe is a frozen dataclass returned by ``get_config()`` in
``experiments/<name>/configs/<recipe>.py``. :func:`parse_flags` picks one with
``--config NAME_OR_PATH`` and gives every dataclass field a flag, derived from its name and
type annotation:

- ``lof_k: int`` -> ``--lof-k 3``; ``ratio: float`` -> ``--ratio 0.2``; ``arch: str``;
- ``patch_layers: tuple[str, ...]`` -> ``--patch-layers layer2,layer3`` (comma-separated);
- ``nan_normalize: bool`` -> ``--nan-normalize`` (on), ``--nan-normalize off`` or
  ``--no-nan-normalize``; accepted values on/off, true/false, yes/no, 1/0;
- ``X | None`` -> as ``X``, and ``none`` or ``auto`` give ``None`` (only ``auto`` where
  ``"none"`` is one of the field's values, as for ``--augmentation none``).

Only the flags that are given override the recipe, so ``--config mvtec_pareto --seed 3``
keeps the rest of that recipe. ``--help`` lists the chosen recipe's values as defaults;
``--print-config`` prints the final config as JSON and exits.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import importlib.util
import json
import pkgutil
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "option",
    "parse_bool",
    "available_configs",
    "load_config",
    "config_parser",
    "parse_flags",
    "write_json",
    "write_csv",
    "markdown_table",
    "jax_banner",
    "pyplot",
]

_EPILOG = ("On/off flags: --flag, --flag on|off (true/false, yes/no, 1/0) or --no-flag. "
           "Lists: comma-separated. Unset optional values: none or auto.")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def option(default: Any, help: str = "", *, choices: Sequence[str] | None = None):
    """A dataclass field with the help text (and allowed values) of its flag."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": tuple(choices or ())})


def parse_bool(text: str) -> bool:
    """``on/off``, ``true/false``, ``yes/no``, ``1/0`` (any case) -> bool."""
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected on/off (or true/false), got {text!r}")


def _check_choice(value, choices, name):
    if choices and value not in choices:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _converter(tp, choices: tuple, name: str) -> Callable[[str], Any]:
    """Text -> value for a field annotation (int, float, str, bool, tuple[X, ...], X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"field {name}: only `X | None` unions are supported, got {tp}")
        conv = _converter(inner[0], choices, name)
        nones = _none_words(choices)
        return lambda text: None if text.strip().lower() in nones else conv(text)
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"field {name}: tuples must be tuple[X, ...], got {tp}")
        conv = _converter(args[0], choices, name)
        return lambda text: tuple(conv(s.strip()) for s in text.split(",") if s.strip())
    if tp is bool:
        return parse_bool
    if tp in (int, float, str):
        return lambda text: _check_choice(tp(text), choices, name)
    raise TypeError(f"field {name}: unsupported type {tp} for a flag")


def _none_words(choices) -> tuple[str, ...]:
    """Spellings of ``None`` for an optional field: ``auto``, and ``none`` unless it is a value."""
    return ("auto",) if "none" in choices else ("auto", "none")


def _is_bool(tp) -> bool:
    return tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                          and set(typing.get_args(tp)) == {bool, type(None)})


def _show(value, choices=()) -> str:
    if value is None:
        return _none_words(choices)[-1]
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def available_configs(package: str) -> list[str]:
    """Recipe names in ``<package>.configs``."""
    mod = importlib.import_module(f"{package}.configs")
    return sorted(m.name for m in pkgutil.iter_modules(mod.__path__) if not m.name.startswith("_"))


def load_config(package: str, name_or_path: str):
    """``get_config()`` of ``<package>.configs.<name>``, or of a ``.py`` file given by path.

    Raises:
        ValueError: no such recipe or file, or the module has no ``get_config``.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".py") or "/" in text or "\\" in text:
        if not path.is_file():
            raise ValueError(f"config file {text!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        known = available_configs(package)
        if text not in known:
            raise ValueError(f"unknown config {text!r}; known: {', '.join(known)}")
        mod = importlib.import_module(f"{package}.configs.{text}")
    if not callable(getattr(mod, "get_config", None)):
        raise ValueError(f"config {text!r} defines no get_config()")
    return mod.get_config()


def config_parser(cfg, *, prog: str, description: str, package: str,
                  config_name: str) -> argparse.ArgumentParser:
    """An argparse parser with ``--config``, ``--print-config`` and one flag per field of
    ``cfg`` (a dataclass instance; its values are shown as the defaults). Every field flag
    defaults to ``argparse.SUPPRESS``: absent flags leave the recipe as it is."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=_EPILOG)
    p.add_argument("--config", default=config_name, metavar="NAME_OR_PATH",
                   help=f"recipe: one of {', '.join(available_configs(package))} or a .py file "
                        f"with get_config() (now: {config_name})")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices", ())
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" [{'|'.join(choices)}]"
        help_text = f"{help_text} (default: {_show(getattr(cfg, f.name), choices)})".strip()
        conv = _converter(hints[f.name], choices, f.name)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if _is_bool(hints[f.name]):
            p.add_argument(flag, nargs="?", const=True, type=conv, metavar="on|off", **kw)
            p.add_argument("--no-" + flag[2:], action="store_const", const=False, dest=f.name,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, type=conv, metavar=f.name.upper(), **kw)
    return p


def parse_flags(argv: Sequence[str] | None, *, package: str, prog: str, description: str,
                default_config: str = "synthetic",
                extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """``(config, namespace)`` from command-line flags.

    ``--config`` selects the recipe (default ``default_config``); each given field flag
    replaces that field (``dataclasses.replace``); ``extra(parser)`` adds flags that are
    not part of the config (e.g. ``--out``), found in the namespace.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--config", default=default_config)
    known, _ = pre.parse_known_args(argv)
    try:
        base = load_config(package, known.config)
    except ValueError as e:
        pre.error(str(e))
    parser = config_parser(base, prog=prog, description=description, package=package,
                           config_name=known.config)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    names = [f.name for f in dataclasses.fields(base)]
    cfg = dataclasses.replace(base, **{n: getattr(ns, n) for n in names if hasattr(ns, n)})
    if ns.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        raise SystemExit(0)
    return cfg, ns


# ------------------------------------------------------------------------------------ output


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON (non-JSON numbers such as numpy floats as floats)."""
    path = Path(path)
    path.write_text(json.dumps(obj, indent=1, default=float))
    return path


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def jax_banner() -> str:
    import jax

    return f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
