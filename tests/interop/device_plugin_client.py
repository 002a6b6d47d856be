"""A device-plugin client on Python grpcio (gRPC C-core), as a third-party tool
would write one: `tests/all/interop.rs` runs it against a plugin socket the host
serves.

Usage: device_plugin_client.py PROTO_DIR SOCKET [--authority AUTHORITY]

Generates the stubs for PROTO_DIR/deviceplugin/v1beta1/api.proto with
grpcio-tools' bundled protoc into a temporary directory (nothing is written
beside the sources), connects to `unix://SOCKET` (with the channel option
`grpc.default_authority` when --authority is given), calls
GetDevicePluginOptions and reads the first ListAndWatch response.

Prints one JSON object on stdout:
  {"options": {...}, "devices": [{"id": ..., "health": ...}, ...]}
or, when a call fails with a gRPC status,
  {"error": "<StatusCode name>", "call": "<method>", "details": "..."}
and exits 0 either way; any other failure (grpcio missing, protoc failing)
exits non-zero with the reason on stderr.
"""

import argparse
import json
import sys
import tempfile

import grpc
from grpc_tools import protoc

# Each call's deadline; the test's own timeout bounds the whole run.
CALL_TIMEOUT_S = 10


def generate_stubs(proto_dir, out_dir):
    """Compiles api.proto into out_dir and returns (messages, services)."""
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "deviceplugin/v1beta1/api.proto",
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed on {proto_dir}/deviceplugin/v1beta1/api.proto ({status})")
    # The generated modules import each other as `deviceplugin.v1beta1.*`
    # (namespace packages: protoc writes no __init__.py).
    sys.path.insert(0, out_dir)
    from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

    return api_pb2, api_pb2_grpc


def query(pb, stubs, socket, authority):
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(f"unix://{socket}", options=options) as channel:
        plugin = stubs.DevicePluginStub(channel)
        call = "GetDevicePluginOptions"
        try:
            got = plugin.GetDevicePluginOptions(pb.Empty(), timeout=CALL_TIMEOUT_S)
            call = "ListAndWatch"
            stream = plugin.ListAndWatch(pb.Empty(), timeout=CALL_TIMEOUT_S)
            first = next(stream)
            stream.cancel()
        except grpc.RpcError as err:
            return {"error": err.code().name, "call": call, "details": err.details()}
        return {
            "options": {
                "pre_start_required": got.pre_start_required,
                "get_preferred_allocation_available": got.get_preferred_allocation_available,
            },
            "devices": [{"id": d.ID, "health": d.health} for d in first.devices],
        }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("proto_dir")
    parser.add_argument("socket")
    parser.add_argument("--authority")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wdp-stubs") as out_dir:
        pb, stubs = generate_stubs(args.proto_dir, out_dir)
        result = query(pb, stubs, args.socket, args.authority)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
