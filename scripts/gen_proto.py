"""Regenerate ``easybackend/proto_gen`` from the ``.proto`` files in ``proto/``.

Usage, from the repository root, in an environment with the test extras
installed (``grpcio-tools`` and ``purerpc``)::

    python scripts/gen_proto.py          # rewrite easybackend/proto_gen/
    python scripts/gen_proto.py --check  # exit 1 if the committed files are stale

For each proto it writes ``<name>_pb2.py`` and ``<name>_pb2.pyi`` (protoc's
Python and type-stub output) and ``<name>_grpc.py`` (purerpc's service base
classes and client stubs, from purerpc's ``protoc-gen-purerpc`` plugin). The
modules are laid out flat in the package, so ``grpc/health/v1/health.proto``
becomes ``easybackend.proto_gen.health_pb2``; the imports protoc emits between
generated modules (``import chat_pb2``, ``import grpc.health.v1.health_pb2``)
are rewritten to package-relative ones (``from . import chat_pb2``).

The output depends only on the protos and on the protoc bundled with
``grpcio-tools``; generated modules check at import time that the protobuf
runtime is at least the version of that protoc (see ``pyproject.toml``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "easybackend" / "proto_gen"
PACKAGE = "easybackend.proto_gen"
# Paths relative to PROTO_DIR, which is the import root.
PROTOS = ["chat.proto", "grpc/health/v1/health.proto"]
SUFFIXES = ["_pb2.py", "_pb2.pyi", "_grpc.py"]

INIT = '''"""Code generated from ``proto/`` by ``python scripts/gen_proto.py``. Do not edit.

``chat_pb2`` / ``chat_grpc``: the ``chat.Chat`` service (messages; purerpc
servicer and stub). ``health_pb2`` / ``health_grpc``: ``grpc.health.v1.Health``.
"""
'''

# ``import a.b.c_pb2 as alias`` (protoc and purerpc) or ``from a.b import c_pb2 as alias`` (protoc).
_IMPORT = re.compile(
    r"^(?:import (?P<dotted>[\w.]+)|from (?P<package>[\w.]+) import (?P<module>\w+))"
    r" as (?P<alias>\w+)$",
    re.MULTILINE,
)


def _module_name(proto: str) -> str:
    """The flat module stem for a proto path: ``grpc/health/v1/health.proto`` -> ``health``."""
    return Path(proto).stem.replace("-", "_")


def _dotted(proto: str) -> str:
    """How protoc names the module of a proto: ``grpc/health/v1/health.proto`` -> ``grpc.health.v1.health``."""
    return proto.removesuffix(".proto").replace("-", "_").replace("/", ".")


def _relative_imports(source: str) -> str:
    """Rewrite imports of generated modules (ours only, never google.protobuf) to ``from . import``."""
    ours = {_dotted(p) + suffix: _module_name(p) + suffix for p in PROTOS for suffix in ("_pb2",)}

    def fix(match: re.Match[str]) -> str:
        dotted = match["dotted"] or f"{match['package']}.{match['module']}"
        if dotted not in ours:
            return match[0]
        return f"from . import {ours[dotted]} as {match['alias']}"

    return _IMPORT.sub(fix, source)


# purerpc's plugin works with proto3 ``optional`` fields (its stubs only name message types)
# but does not declare it, and protoc refuses to run a plugin that does not: run it with its
# output captured and add the declaration.
PLUGIN = """\
import io
import sys

from google.protobuf.compiler.plugin_pb2 import CodeGeneratorResponse
from purerpc.protoc_plugin.plugin import main

stdout, sys.stdout = sys.stdout, io.TextIOWrapper(io.BytesIO())
main()
response = CodeGeneratorResponse.FromString(sys.stdout.buffer.getvalue())
response.supported_features |= CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
stdout.buffer.write(response.SerializeToString())
"""


def _plugin(workdir: Path) -> Path:
    """An executable that runs purerpc's protoc plugin with this interpreter."""
    code = workdir / "purerpc_plugin.py"
    code.write_text(PLUGIN)
    script = workdir / "protoc-gen-purerpc"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(code))}\n")
    script.chmod(0o755)
    return script


def generate() -> dict[str, str]:
    """Run protoc and return ``{file name: content}`` of the package to write."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = {"__init__.py": INIT}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--proto_path={well_known}",
            f"--plugin=protoc-gen-purerpc={_plugin(work)}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--purerpc_out={out}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see above)")
        for proto in PROTOS:
            generated = out / Path(proto).parent
            for suffix in SUFFIXES:
                source = (generated / f"{Path(proto).stem.replace('-', '_')}{suffix}").read_text()
                source = _relative_imports(source).replace(
                    f"'{_dotted(proto)}_pb2'", f"'{PACKAGE}.{_module_name(proto)}_pb2'"
                )  # the classes' __module__
                files[_module_name(proto) + suffix] = source
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the generated files are up to date"
    )
    args = parser.parse_args(argv)
    files = generate()
    existing = {p.name for p in OUT_DIR.glob("*.py*") if p.is_file()}
    if args.check:
        stale = sorted(
            name
            for name, content in files.items()
            if not (OUT_DIR / name).is_file() or (OUT_DIR / name).read_text() != content
        )
        extra = sorted(existing - set(files))
        if stale or extra:
            print(f"easybackend/proto_gen is out of date: {', '.join(stale + extra)}")
            print("run: python scripts/gen_proto.py")
            return 1
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in existing - set(files):
        (OUT_DIR / name).unlink()
    for name, content in sorted(files.items()):
        (OUT_DIR / name).write_text(content)
    print(f"wrote {len(files)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
