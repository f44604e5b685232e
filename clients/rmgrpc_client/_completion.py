"""`rmgrpcctl completion bash|zsh`: a static completion script written from the parser.

The script knows every command, action (``quota set``), flag, and the values of enum
flags (``-o``, ``--state``); it needs no Python at completion time. Zsh loads the same
function through bashcompinit.
"""

from __future__ import annotations

import argparse
import shlex

from rmgrpc_client._cliutil import EnumArg, subparsers


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """Long flags of `parser`, after the fixed values of its positionals (``bash zsh``)."""
    fixed = [
        word
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        for word in (_values(a) or [])
    ]
    return fixed + sorted(s for a in parser._actions for s in a.option_strings if s[:2] == "--")


def _values(action: argparse.Action) -> list[str] | None:
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return [str(c) for c in action.choices]
    if isinstance(action.type, EnumArg):
        return action.type.words
    return None


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _value_cases(parser: argparse.ArgumentParser, pattern: str) -> list[str]:
    """``case`` arms completing the values of `parser`'s enum flags, matched against
    ``"$cmd $action|$prev"``."""
    arms = []
    for action in parser._actions:
        words = _values(action) if action.option_strings else None
        if words:
            options = "|".join(f"{pattern}{shlex.quote('|' + o)}" for o in action.option_strings)
            arms.append(f"        {options}) words={shlex.quote(' '.join(words))} ;;")
    return arms


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for `parser`'s program, registered with ``complete``."""
    prog = parser.prog
    func = "_" + prog.replace("-", "_")
    takes_value = sorted(
        {
            option
            for p in (parser, *subparsers(parser))
            for action in p._actions
            if action.nargs != 0
            for option in action.option_strings
        }
    )
    commands = _commands(parser)
    flag_arms: list[str] = []
    value_arms: list[str] = []
    for name, sub in sorted(commands.items()):
        actions = _commands(sub)
        for action_name, action_parser in sorted(actions.items()):
            key = shlex.quote(f"{name} {action_name}")
            flags = shlex.quote(" ".join(_flags(action_parser)))
            flag_arms.append(f"            {key}) words={flags} ;;")
            value_arms += _value_cases(action_parser, key)
        if actions:
            names = shlex.quote(" ".join(sorted(actions)))
            flag_arms.append(f"            {shlex.quote(name + ' ')}) words={names} ;;")
        else:
            flags = shlex.quote(" ".join(_flags(sub)))
            flag_arms.append(f"            {shlex.quote(name + ' ')}*) words={flags} ;;")
            value_arms += _value_cases(sub, shlex.quote(name + " ") + "*")
    value_arms += _value_cases(parser, "*")  # global flags, in any position
    top = " ".join([*sorted(commands), *_flags(parser)])
    lines = [
        f"# bash completion for {prog}; made by `{prog} completion bash`.",
        f"# Load it with: source <({prog} completion bash)",
        f"{func}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local cmd="" action="" i word words=""',
        # Find the command and its action, skipping flags and the values they take.
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        word="${COMP_WORDS[i]}"',
        '        case "$word" in',
        f"            {'|'.join(takes_value)}) ((i++)) ;;",
        "            -*) ;;",
        '            *) if [[ -z $cmd ]]; then cmd="$word";'
        ' elif [[ -z $action ]]; then action="$word"; fi ;;',
        "        esac",
        "    done",
        '    case "$cmd $action|$prev" in',
        *value_arms,
        "    esac",
        "    if [[ -z $words ]]; then",
        '        case "$cmd $action" in',
        *flag_arms,
        f"            ' ') words={shlex.quote(top)} ;;",
        "        esac",
        "    fi",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        f"complete -o default -F {func} {prog}",
    ]
    return "\n".join(lines) + "\n"


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """The bash function, loaded into zsh through bashcompinit."""
    return (
        f"#compdef {parser.prog}\n"
        f"# zsh completion for {parser.prog}; made by `{parser.prog} completion zsh`.\n"
        "autoload -U +X compinit && compinit\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser)
    )


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell` (``bash`` or ``zsh``)."""
    return zsh_script(parser) if shell == "zsh" else bash_script(parser)
