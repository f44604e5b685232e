"""The README's grpcurl examples, copy-pasted against a real server, all work."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tests.conftest import ServerProcess
from tests.e2e.test_grpcurl import GRPCURL, pytestmark  # noqa: F401  (skip without grpcurl)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_grpcurl_commands() -> list[str]:
    """Each grpcurl command of the README's grpcurl section, continuation lines joined."""
    text = README.read_text()
    section = re.search(r"## Talking to it with grpcurl.*?```sh\n(.*?)```", text, re.S)
    assert section, "README lost its grpcurl section"
    commands: list[str] = []
    pending = ""
    for line in section.group(1).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += (" " if pending else "") + line.rstrip().removesuffix("\\").rstrip()
        # A command ends at a line that neither continues nor leaves a quote open.
        if not line.rstrip().endswith("\\") and pending.count("'") % 2 == 0:
            commands.append(pending)
            pending = ""
    return commands


def test_every_readme_grpcurl_example_runs(server_process: ServerProcess) -> None:
    commands = readme_grpcurl_commands()
    assert len(commands) >= 10
    allocation_id = ""
    for command in commands:
        argv = shlex.split(command.replace("127.0.0.1:50051", server_process.target))
        assert argv[0] == "grpcurl"
        argv[0] = str(GRPCURL)
        argv = [a.replace("a-…", allocation_id) for a in argv]
        streaming = "WatchAllocations" in command
        if streaming:
            argv.insert(1, "-max-time")
            argv.insert(2, "2")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if streaming:
            assert '"revision"' in proc.stdout, proc.stderr
            continue
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        found = re.search(r'"id": "(a-[0-9a-f]+)"', proc.stdout)
        if found and not allocation_id:
            allocation_id = found.group(1)
    assert allocation_id, "no example created an allocation"
