"""The gRPC floor: a bare grpc.aio server speaking the coordinator's service, doing no work of its own.

Why: ``coordinator_load.py --lightweight`` measures the coordinator's CPU per report; part of it is what
grpc.aio costs for any stream of that size (HTTP/2 framing, the completion queue, waking the event loop
for each message) and part is the coordinator's (checks, assembly, the fold, the commit). Driven by the
same load generator with the same reports, this server's CPU is the first part alone, so
``coordinator / floor`` says how much of the figure is ours to cut.

It runs as its own process (``FloorProcess``), with the options ``fedrecon serve`` uses
(``server.app.server_options``: message limits, no BDP probing, keepalive) and the same service name and
methods, registered the same way (a generic handler taking raw bytes):

- ``CheckIn`` answers every caller with one assignment serialized at start (the task's name, the model's
  spec and training configuration, a fixed round and token), without reading the request;
- ``DownloadModel`` writes the global variables' stream (``tensors.tensor_stream`` of zeros shaped like
  the task's model, the coordinator's chunk size), encoded once at start, as the coordinator's cache
  does;
- ``ReportUpdate`` reads its stream with ``context.read()`` to the end, as the coordinator's servicer
  does, and discards it; it answers ``accepted``.

    python benchmarks/grpc_floor.py --task task.toml --port-file floor.port
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from fedrecon.core.model_spec import model_from_config
from fedrecon.server.app import DEFAULT_MAX_MESSAGE_BYTES, server_options
from fedrecon.server.task import TaskSpec
from fedrecon.tensors import DEFAULT_CHUNK_BYTES, tensor_stream
from fedrecon.v1 import coordinator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
ROUND_ID = 1
TOKEN = "floor-token-" + "0" * 12  # 24 characters, as long as the coordinator's (secrets.token_urlsafe(18))


def assignment_reply(spec: TaskSpec) -> bytes:
    """The serialized ``CheckInResponse`` every check-in gets: the fields the coordinator fills, of about
    the same sizes (its model spec and training configuration are the task's, as JSON)."""
    return pb.CheckInResponse(assignment=pb.Assignment(
        task_name=spec.name, round_id=ROUND_ID, round_num=1, model_version=0, assignment_token=TOKEN,
        reporting_deadline=Timestamp(seconds=int(time.time()) + 3600),
        model_spec_json=json.dumps(spec.model, sort_keys=True),
        training_config_json=json.dumps(spec.training.to_dict(), sort_keys=True), batch_size=spec.batch_size,
        max_chunk_bytes=DEFAULT_CHUNK_BYTES)).SerializeToString()


def download_messages(spec: TaskSpec, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """The model download's messages: the task model's global variables (zeros: the floor needs their
    sizes, not their values), encoded as ``DownloadModel`` streams them."""
    model = model_from_config(spec.model)
    names = [v.name for v in model.global_variables]
    arrays = [np.zeros(tuple(v.shape), np.float32) for v in model.global_variables]
    return [m.SerializeToString() for m in tensor_stream(names, arrays, chunk_bytes)]


def handler(check_in: bytes, download: list[bytes]) -> grpc.GenericRpcHandler:
    """The three calls the load generator makes, each doing the least that answers it."""
    accepted = pb.ReportUpdateResponse(accepted=True).SerializeToString()

    async def check_in_call(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return check_in

    async def download_call(_request: bytes, context: grpc.aio.ServicerContext) -> None:
        for message in download:
            await context.write(message)

    async def report_call(_requests: object, context: grpc.aio.ServicerContext) -> bytes:
        while await context.read() is not grpc.aio.EOF:
            pass
        return accepted

    return grpc.method_handlers_generic_handler(SERVICE, {
        "CheckIn": grpc.unary_unary_rpc_method_handler(check_in_call),
        "DownloadModel": grpc.unary_stream_rpc_method_handler(download_call),
        "ReportUpdate": grpc.stream_unary_rpc_method_handler(report_call),
    })


async def serve(spec: TaskSpec, host: str, port: int, port_file: Path) -> None:
    """Serve until SIGTERM; the bound port goes to ``port_file`` (written whole, by a rename)."""
    server = grpc.aio.server(options=server_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((handler(assignment_reply(spec), download_messages(spec)),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    partial = port_file.with_suffix(".tmp")
    partial.write_text(str(bound))
    partial.rename(port_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


class FloorProcess:
    """This module's server as a child process; its pid is the serving process (its CPU is the floor's)."""

    def __init__(self, task_file: Path, workdir: Path, *, timeout_s: float = 120.0) -> None:
        port_file = workdir / "floor.port"
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--task", str(task_file),
                                      "--port-file", str(port_file)])
        give_up = time.monotonic() + timeout_s
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > give_up:
                self.stop()
                raise RuntimeError(f"the gRPC floor server did not start (exit {self.proc.returncode})")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL if it does not end in time); the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=Path, required=True, help="the task file the coordinator serves")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(TaskSpec.load(args.task), args.host, args.port, args.port_file))


if __name__ == "__main__":
    main()
