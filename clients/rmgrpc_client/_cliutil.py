"""Pieces of `rmgrpcctl` that are about the command line itself rather than any command:
global flags accepted in any position, defaults in every help text, enum arguments that
shell completion can list, the unreachable-server hint, and errors the CLI raises."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator, Sequence

import grpc

from rmgrpc_client._errors import RmgrpcError


class CliError(Exception):
    """A failure the CLI reports as one ``error: …`` line, exiting with `exit_code`."""

    def __init__(self, text: str, exit_code: int = 1) -> None:
        super().__init__(text)
        self.exit_code = exit_code


class NoSuchTenant(CliError):
    """A tenant name no quota and no allocation knows, usually a typo; says which known
    names are close."""

    def __init__(self, tenant: str, close: Sequence[str]) -> None:
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        super().__init__(f"no such tenant {tenant!r}{hint}")
        self.tenant = tenant
        self.close = list(close)


# The handshake failed: the server is up but TLS is wrong, so "is it running?" would mislead.
_TLS_WORDS = ("ssl", "tls", "handshake", "certificate")


def unreachable_hint(error: RmgrpcError, server: str) -> CliError | None:
    """For a call that never reached the server, the hint an operator can act on (exit
    status 2); None when the server answered or the problem is something else."""
    if error.code != grpc.StatusCode.UNAVAILABLE:
        return None
    if any(word in error.message.lower() for word in _TLS_WORDS):
        return None
    return CliError(
        f"cannot reach {server} — is the server running? set --server or RMGRPC_SERVER",
        exit_code=2,
    )


class EnumArg:
    """An argparse `type` accepting an enum value by its short name in any case
    (``allocated`` for ``ALLOCATION_STATE_ALLOCATED``); `words` are those short names,
    which help and shell completion list."""

    def __init__(self, names: Sequence[str], prefix: str) -> None:
        self.names = [n for n in names if not n.endswith("_UNSPECIFIED")]
        self.prefix = prefix
        self.words = [n.removeprefix(prefix).lower() for n in self.names]

    def __call__(self, text: str) -> str:
        wanted = text.upper()
        for name in (wanted, self.prefix + wanted):
            if name in self.names:
                return name
        raise argparse.ArgumentTypeError(
            f"unknown value {text!r} (choose from {', '.join(self.words)})"
        )


def subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below `parser` (commands, and their actions such as ``quota set``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases appear twice
                yield sub
                yield from subparsers(sub)


def globals_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let the top-level flags of `parser` (``--server``, ``-o``, …) also come after the
    command, as kubectl allows: each command gets a copy whose default is SUPPRESS, so it
    only sets the value when given and the top-level one stands otherwise."""
    shared = [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]
    for sub in subparsers(parser):
        group = sub.add_argument_group("global options (also accepted before the command)")
        for action in shared:
            if any(s in sub._option_string_actions for s in action.option_strings):
                continue  # the command has a flag of that name: it wins
            twin = copy.copy(action)
            twin.default = argparse.SUPPRESS
            group._add_action(twin)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter without the noise: a default that says nothing
    (None, False, "", []) is left out, since the help text says what absence means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, "", []):
            return action.help
        return super()._get_help_string(action)


def defaults_in_help(parser: argparse.ArgumentParser) -> None:
    """Show every flag's default in ``--help``, on the top-level parser and every command."""
    for p in (parser, *subparsers(parser)):
        p.formatter_class = _DefaultsFormatter


def value_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Every flag of `parser` and its commands, for checks that each has help text."""
    for p in (parser, *subparsers(parser)):
        for action in p._actions:
            if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                yield action
