"""The `debias` command: a table of subcommands, litgpt-style, each a module imported only when it runs.

    debias fit --config configs/tiny.yaml [--model.edit.entries 20 ...]  LightningCLI (fit, validate)
    debias mask configs/tiny.yaml --out runs/tiny/mask.safetensors     plain typed functions (jsonargparse)
    debias export configs/tiny.yaml runs/tiny/.../last.ckpt runs/tiny/export2
    debias compare configs/smollm2.yaml

Errors the user caused (a bad value, a missing file) print one line, `debias: error: ...`, and exit 2; a key or
value the parser refuses adds `see: debias COMMAND --help` instead of the full usage. `--debug` (or
`DEBIAS_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from argparse import ArgumentError

#: name -> (module, function, one-line summary); "sae" has subcommands. `fit` and `validate` are LightningCLI's.
COMMANDS: dict[str, tuple[str, str, str] | dict[str, tuple[str, str, str]]] = {
    "fit": ("debias.commands.fit", "fit", "train the edit of a config (LightningCLI), evaluate it and export it"),
    "validate": ("debias.commands.fit", "validate", "score a config's model on its validation split (LightningCLI)"),
    "mask": ("debias.commands.mask", "mask", "compute and save the instability mask of a config"),
    "export": ("debias.commands.export", "export", "export a trained checkpoint (merged model, adapter, delta)"),
    "eval": ("debias.commands.eval", "eval_command", "evaluate any model against its base (held-out and suites)"),
    "compare": ("debias.commands.compare.run", "compare_command", "run every method on one config, in one grid"),
    "generate": ("debias.commands.generate", "generate_command", "complete prompts with a model or intervention"),
    "features": ("debias.commands.features", "features_command", "rank SAE latents by their effect on the bias"),
    "sae": {"train": ("debias.commands.sae", "sae_train_command", "train (or reuse) the project's TopK SAE")},
}

#: Exceptions that mean "the input is wrong", shown as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def usage() -> str:
    lines = ["usage: debias COMMAND [ARGS] (debias COMMAND --help)", "", "commands:"]
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            lines += [f"  {name} {sub:<12}{summary}" for sub, (_, _, summary) in entry.items()]
        else:
            lines.append(f"  {name:<15}{entry[2]}")
    lines += ["", "options: --debug (or DEBIAS_DEBUG=1) shows tracebacks"]
    return "\n".join(lines)


def _resolve(argv: list[str]):
    """(function, its arguments, whether it is a LightningCLI command) for `argv`."""
    entry = COMMANDS[argv[0]]
    if isinstance(entry, dict):
        if len(argv) < 2 or argv[1] not in entry:
            raise ValueError(f"'debias {argv[0]}' needs one of {sorted(entry)}, got {argv[1:2] or 'nothing'}")
        (module, name, _), args = entry[argv[1]], argv[2:]
    else:
        (module, name, _), args = entry, argv[1:]
    return getattr(importlib.import_module(module), name), args, argv[0] in ("fit", "validate")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DEBIAS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        print(f"debias: error: unknown command {argv[0]!r}; expected one of {list(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    command = " ".join(argv[:2] if isinstance(COMMANDS[argv[0]], dict) else argv[:1])
    try:
        function, args, lightning = _resolve(argv)
        if lightning:
            function(args)
        else:
            from jsonargparse import auto_cli

            auto_cli(function, args=args, exit_on_error=False, prog=f"debias {command}")
    except ArgumentError as err:  # jsonargparse's: a bad key or value, in a config file or on the command line
        if debug:
            raise
        print(f"debias: error: {one_line(err)}\nsee: debias {command} --help", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"debias: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


#: Lines of a jsonargparse message that repeat the value or list the alternatives of an `X | None` type.
_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
                 "Given value:", "Problem with given class_path", "Expected a <class 'NoneType'>")


def one_line(err: BaseException) -> str:
    """The error's message in one line: its lines joined (collected problems are listed one per line), and
    jsonargparse's `Parser key "K":` nesting and `X | None` alternatives reduced to `K: reason`."""
    text = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror}: {err.filename}"
    where, reasons = "", []
    for line in text.splitlines():
        line = line.strip().removeprefix("- ").strip()  # "- " bullets, not "--flag"
        key = re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:  # nested keys are relative to the enclosing one ("model.edit", then "method")
            where = key[1] if not where or key[1].startswith(where + ".") else f"{where}.{key[1]}"
            line = key[2]
        if line and not line.startswith(_PARSER_NOISE):
            reasons.append(line)
    message = reasons[0] if reasons else type(err).__name__
    for reason in reasons[1:]:  # "invalid model.edit arguments:" then its problems
        message += (" " if message.endswith(":") else "; ") + reason
    return f"{where}: {message}" if where else message
