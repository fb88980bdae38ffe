"""`rekkord completion bash|zsh`: shell completion scripts generated from the
argument parser, so they always know every command and option.

What completes: command names, each command's options (hidden aliases left
out), the values of options with choices (-f plain|json, -t TYPE), files for
FILE options and PATH arguments, folders for DIR, DEST and MNT.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

from .parser import build_parser

_FILE_METAVARS = {"FILE", "PATH"}
_DIR_METAVARS = {"DIR", "DEST", "MNT", "MNT/staging/CHANNEL"}


@dataclass
class Option:
    flags: list[str]
    help: str
    takes_value: bool
    metavar: str = ""
    choices: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return _kind(self.metavar, self.choices)


@dataclass
class Positional:
    metavar: str
    help: str
    nargs: object
    choices: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return _kind(self.metavar, self.choices)


@dataclass
class Command:
    name: str
    help: str
    options: list[Option]
    positionals: list[Positional]


def _kind(metavar: str, choices: list[str]) -> str:
    """'choices', 'file', 'dir' or 'none': what completes a value."""
    if choices:
        return "choices"
    if metavar in _FILE_METAVARS:
        return "file"
    if metavar in _DIR_METAVARS:
        return "dir"
    return "none"


def _describe(parser: argparse.ArgumentParser) -> tuple[list[Option], list[Positional]]:
    options: list[Option] = []
    positionals: list[Positional] = []
    for action in parser._actions:  # argparse has no public API to list them
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        choices = [str(c) for c in (action.choices or getattr(action, "completions", None) or [])]
        metavar = action.metavar if isinstance(action.metavar, str) else (action.dest or "").upper()
        text = (action.help or "").replace("%%", "%")  # help strings are %-formatted by argparse
        if action.option_strings:
            options.append(Option(list(action.option_strings), text, action.nargs != 0, metavar, choices))
        else:
            positionals.append(Positional(metavar, text, action.nargs, choices))
    return options, positionals


def describe_cli() -> tuple[list[Option], list[Command]]:
    """The top-level options and every command, as the parser defines them."""
    parser = build_parser()
    top, _ = _describe(parser)
    commands: list[Command] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                options, positionals = _describe(sub)
                commands.append(Command(name, helps.get(name, ""), options, positionals))
    return top, commands


# --- bash ---------------------------------------------------------------------------


def _bash_complete(kind: str, choices: list[str]) -> str:
    """The command that fills COMPREPLY for a value of this kind (words are flags
    and plain names: no quoting needed inside double quotes)."""
    if kind == "choices":
        return f'COMPREPLY=($(compgen -W "{" ".join(choices)}" -- "$cur"))'
    if kind == "file":
        return 'COMPREPLY=($(compgen -f -- "$cur"))'
    if kind == "dir":
        return 'COMPREPLY=($(compgen -d -- "$cur"))'
    return "COMPREPLY=()"


def _bash_arguments(positionals: list[Positional]) -> str:
    first = positionals[0] if positionals else None
    if first is not None and first.kind == "choices":
        return _bash_complete("choices", first.choices)
    for kind in ("file", "dir"):
        if any(p.kind == kind for p in positionals):
            return _bash_complete(kind, [])
    return "COMPREPLY=()"


def _bash_case(name: str, options: list[Option], arguments: str) -> str:
    words = " ".join(flag for option in options for flag in option.flags)
    return (f'        {name}) if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "{words}" -- "$cur")); '
            f"else {arguments}; fi ;;")


def bash_script() -> str:
    top, commands = describe_cli()
    with_value: dict[str, Option] = {}
    for option in top + [o for c in commands for o in c.options]:
        if option.takes_value:
            for flag in option.flags:
                with_value.setdefault(flag, option)
    # the same letter means the same thing in every command, so one table serves all
    value_cases = "\n".join(f"        {flag}) {_bash_complete(option.kind, option.choices)}; return ;;"
                            for flag, option in sorted(with_value.items()))
    names = " ".join(c.name for c in commands)
    cases = [_bash_case('""', top, _bash_complete("choices", names.split()))]
    cases += [_bash_case(c.name, c.options, _bash_arguments(c.positionals)) for c in commands]
    return f"""# bash completion for rekkord, generated by 'rekkord completion bash'
_rekkord() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local command="" word i skip=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        if [[ -n $skip ]]; then skip=""; continue; fi
        case $word in
            {"|".join(sorted(with_value))}) skip=1 ;;
            -*) ;;
            *) command=$word; break ;;
        esac
    done
    case $prev in
{value_cases}
    esac
    case $command in
{chr(10).join(cases)}
    esac
}}
complete -o filenames -F _rekkord rekkord
"""


# --- zsh ----------------------------------------------------------------------------


def _zsh_escape(text: str, colons: bool = False) -> str:
    """Text inside a single-quoted _arguments spec: quotes closed and reopened,
    brackets escaped, and colons too where they would end a field."""
    text = text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    if colons:
        text = text.replace(":", "\\:")
    return text.replace("'", "'\\''")


def _zsh_action(kind: str, choices: list[str]) -> str:
    if kind == "choices":
        return f"({' '.join(choices)})"
    return {"file": "_files", "dir": "_files -/"}.get(kind, " ")


def _zsh_option_specs(options: list[Option]) -> list[str]:
    specs = []
    for option in options:
        exclusive = f"({' '.join(option.flags)})" if len(option.flags) > 1 else ""
        for flag in option.flags:
            if flag in ("-h", "--help", "--version"):
                exclusive_here = "(- *)"
            else:
                exclusive_here = exclusive
            repeatable = "*" if flag in ("-e", "--exclude", "--exclude-file", "-c", "--channel") else ""
            suffix = ("=" if flag.startswith("--") else "+") if option.takes_value else ""
            spec = f"{exclusive_here if not repeatable else ''}{repeatable}{flag}{suffix}[{_zsh_escape(option.help)}]"
            if option.takes_value:
                spec += f":{_zsh_escape(option.metavar or 'value', True)}:{_zsh_action(option.kind, option.choices)}"
            specs.append(f"'{spec}'")
    return specs


def _zsh_positional_specs(positionals: list[Positional]) -> list[str]:
    specs = []
    for index, positional in enumerate(positionals, start=1):
        action = _zsh_action(positional.kind, positional.choices)
        label = _zsh_escape(positional.metavar, True)
        if positional.nargs in ("+", "*"):
            specs.append(f"'*:{label}:{action}'")
        elif positional.nargs == "?":
            specs.append(f"'{index}::{label}:{action}'")
        else:
            specs.append(f"'{index}:{label}:{action}'")
    return specs


def zsh_script() -> str:
    top, commands = describe_cli()
    indent = " \\\n    "
    top_specs = indent.join(_zsh_option_specs(top) + ["'1:command:->command'", "'*::argument:->argument'"])
    described = "\n".join(f"    {shlex.quote(c.name + ':' + c.help.replace(':', ' -'))}" for c in commands)
    cases = []
    for command in commands:
        specs = (indent + "  ").join(_zsh_option_specs(command.options) + _zsh_positional_specs(command.positionals))
        cases.append(f"    {command.name})\n      _arguments -s{indent}  {specs} ;;")
    return f"""#compdef rekkord
# zsh completion for rekkord, generated by 'rekkord completion zsh'
_rekkord() {{
  local curcontext=$curcontext state line
  local -a commands=(
{described}
  )
  _arguments -C -s{indent}{top_specs}
  case $state in
  command)
    _describe -t commands 'rekkord command' commands ;;
  argument)
    curcontext=${{curcontext%:*:*}}:rekkord-$line[1]:
    case $line[1] in
{chr(10).join(cases)}
    esac ;;
  esac
}}
# autoloaded from fpath: complete now; sourced: register the function
if [[ ${{funcstack[1]}} == _rekkord ]]; then
  _rekkord "$@"
else
  compdef _rekkord rekkord
fi
"""


def completion(args: argparse.Namespace, _make_config: object) -> int:
    print(bash_script() if args.shell == "bash" else zsh_script(), end="")
    return 0
