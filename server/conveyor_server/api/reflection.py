"""Server reflection under both of its names: grpc.reflection.v1 (what grpcurl, buf curl and
most tools ask first) and grpc.reflection.v1alpha.

grpcio-reflection (1.85) ships v1alpha only. v1 is the same protocol under a new package
(the same messages, fields and numbers), so one v1alpha servicer answers both: v1 calls are
decoded with the v1alpha types, which read the same bytes, and v1's descriptor (v1alpha's,
renamed) is added to the pool so reflection can describe v1 itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
SERVICE_NAMES = (V1_SERVICE, V1ALPHA_SERVICE)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on `server`, listing `service_names` and both of its own."""
    add_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer((*service_names, *SERVICE_NAMES))
    server.add_generic_rpc_handlers((
        _handler(V1_SERVICE, servicer),
        _handler(V1ALPHA_SERVICE, servicer),
    ))


def add_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto (v1alpha's, renamed) in the default pool, once."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # a message or enum field (an empty one would be set)
                field.type_name = field.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    pool.AddSerializedFile(proto.SerializeToString())


def _handler(service: str, servicer: Any) -> grpc.GenericRpcHandler:
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": method})
