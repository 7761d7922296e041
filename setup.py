"""Build hook: compile the wire contract in protos/ with grpcio-tools before the package is assembled.

pyproject.toml holds all packaging metadata; this file only adds the code-generation step, so the
generated modules in fedrecon/v1/ are never edited by hand nor committed (they are in .gitignore).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"


def compile_protos() -> None:
    """Run protoc (from grpcio-tools) on every .proto file; outputs land beside the `fedrecon` package."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={ROOT}",
                f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto.relative_to(ROOT)}")


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
