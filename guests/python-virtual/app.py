"""Imaginary devices, written in Python: the `virtual-devices` guest in a second language.

Behaves like `guests/virtual-devices/src/lib.rs`, with its own default kind so that
both can be loaded side by side without claiming the same resource.

Configuration (all optional):
- `kinds`: comma-separated `name=count`, default `py-dev=2`;
- `node`: the node segment of the ids, default `node1`;
- `unhealthy`: comma-separated device ids that `scan` and `health` report unhealthy;
- `numa-nodes`: spread the devices round-robin over this many NUMA nodes.

Ids look like `/node1/pydev/2` (kind `py-dev` with `-` removed, device 2).
`allocate` sets `DEV_<kind>_ID_<n>=<id>` for the n-th device of the container (kind
with every character outside `[A-Za-z0-9]` made `_`, n from 0), and `post-allocate`
adds the annotation `virtual.example.com/devices` listing the container's ids.

The component is built with `componentize-py --stub-wasi` (see the README, "A guest
in Python"): every WASI import is a stub that traps. So this module must not touch
files, clocks, `os.urandom` or stdio (`print` traps); it talks to the host only
through `host.log` and `host.get-config`. Errors are raised as `Err(ModuleError_*)`,
which the bindings return as the WIT `module-error`.
"""

import re
from typing import List, Tuple

import wit_world
from componentize_py_types import Err
from wit_world.imports import host
from wit_world.imports.host import LogLevel
from wit_world.imports.types import (
    AllocateRequest,
    ContainerResponse,
    Device,
    DeviceKind,
    DeviceRef,
    Health,
    KeyValue,
    ModuleError_InvalidRequest,
)

DEFAULT_KINDS = "py-dev=2"
DEFAULT_NODE = "node1"
ANNOTATION = "virtual.example.com/devices"

# What Rust's `str::parse` accepts for the counts (`u32`) and `numa-nodes` (`i64`);
# Python's `int()` would also take spaces, `_` and non-ASCII digits.
_UNSIGNED = re.compile(r"\+?[0-9]+")
_SIGNED = re.compile(r"[+-]?[0-9]+")
_U32_MAX = 2**32 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _invalid(message: str) -> Err:
    return Err(ModuleError_InvalidRequest(message))


def _kinds() -> List[Tuple[str, int]]:
    """The configured kinds as (name, count)."""
    raw = host.get_config("kinds")
    if raw is None:
        raw = DEFAULT_KINDS
    kinds = []
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, count = entry.partition("=")
        if not sep:
            raise _invalid(f"config `kinds`: `{entry}` is not name=count")
        count = count.strip()
        if not _UNSIGNED.fullmatch(count) or int(count) > _U32_MAX:
            raise _invalid(f"config `kinds`: `{count}` is not a count")
        kinds.append((name.strip(), int(count)))
    return kinds


def _numa_nodes() -> int:
    raw = host.get_config("numa-nodes")
    if raw is None:
        return 0
    value = raw.strip()
    if not _SIGNED.fullmatch(value) or not _I64_MIN <= int(value) <= _I64_MAX:
        raise _invalid(f"config `numa-nodes`: `{raw}` is not a number")
    return int(value)


def _unhealthy_ids() -> List[str]:
    raw = host.get_config("unhealthy")
    if raw is None:
        return []
    return [item.strip() for item in raw.split(",") if item.strip()]


def _device_id(node: str, kind: str, n: int) -> str:
    return f"/{node}/{kind.replace('-', '')}/{n}"


def _env_safe(kind: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in kind)


def _empty_response() -> ContainerResponse:
    return ContainerResponse(envs=[], devices=[], mounts=[], annotations=[], cdi_devices=[])


class WitWorld(wit_world.WitWorld):
    """The exports of the `device-plugin` world."""

    def scan(self) -> List[DeviceKind]:
        node = host.get_config("node")
        if node is None:
            node = DEFAULT_NODE
        numa = _numa_nodes()
        unhealthy = _unhealthy_ids()
        kinds = _kinds()
        host.log(LogLevel.DEBUG, f"scanning {len(kinds)} kinds")
        result = []
        for name, count in kinds:
            devices = []
            for n in range(1, count + 1):
                device_id = _device_id(node, name, n)
                devices.append(
                    Device(
                        id=device_id,
                        health=Health.UNHEALTHY if device_id in unhealthy else Health.HEALTHY,
                        numa_nodes=[(n - 1) % numa] if numa > 0 else [],
                        # Everything a container needs is worked out in `allocate`.
                        allocation=_empty_response(),
                    )
                )
            result.append(DeviceKind(name=name, devices=devices))
        return result

    def health(self, devices: List[DeviceRef]) -> List[Health]:
        unhealthy = _unhealthy_ids()
        return [Health.UNHEALTHY if d.id in unhealthy else Health.HEALTHY for d in devices]

    def allocate(self, request: AllocateRequest) -> List[ContainerResponse]:
        kind = _env_safe(request.kind)
        responses = []
        for container in request.containers:
            response = _empty_response()
            response.envs = [
                KeyValue(key=f"DEV_{kind}_ID_{n}", value=device_id)
                for n, device_id in enumerate(container.device_ids)
            ]
            responses.append(response)
        return responses

    def post_allocate(
        self, request: AllocateRequest, response: List[ContainerResponse]
    ) -> List[ContainerResponse]:
        for container, reply in zip(request.containers, response):
            ids = ",".join(container.device_ids)
            reply.annotations.append(KeyValue(key=ANNOTATION, value=ids))
        return response
