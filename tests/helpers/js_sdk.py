"""Running the official OpenAI JavaScript SDK's scripts of ``tests/js`` (npm ``openai``, pinned
there) against a live server: ``NODE`` is the ``node`` found (None: the tests skip), and
:func:`run_script` runs one script to its end and returns the one line of JSON it prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

JS = Path(__file__).resolve().parent.parent / "js"
NODE = shutil.which("node")


async def run_script(name: str, env: dict[str, str], timeout: float = 60) -> dict:
    """Run ``node tests/js/NAME`` to completion; its last line of output, as JSON. Fails the
    test (with the command to run) when the SDK is not installed, or when the script fails."""
    if not (JS / "node_modules" / "openai" / "package.json").is_file():
        pytest.fail(
            "the JavaScript SDK is not installed: run `npm ci --prefix tests/js` first",
            pytrace=False,
        )
    assert NODE is not None
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [NODE, str(JS / name)],
            cwd=JS,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output[-4000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])
