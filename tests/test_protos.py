"""The generated wire code matches protos/ (it is produced at build time and never edited by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc_tools

import fedrecon.v1

REPO = Path(__file__).resolve().parents[1]


def test_generated_modules_match_the_proto_files(tmp_path: Path) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted((REPO / "protos").rglob("*.proto"))
    assert protos, "no .proto files found"
    for proto in protos:
        # In a child process: protoc inside a process that has already loaded TensorFlow can crash.
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}", f"-I{well_known}",
                        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(proto)], check=True)
    installed = Path(fedrecon.v1.__file__).parent
    fresh = sorted((tmp_path / "fedrecon" / "v1").glob("*.py"))
    assert [p.name for p in fresh] == ["coordinator_pb2.py", "coordinator_pb2_grpc.py"]
    for path in fresh:
        assert (installed / path.name).read_text() == path.read_text(), (
            f"{path.name} is stale: reinstall (make setup) to regenerate it from protos/")
