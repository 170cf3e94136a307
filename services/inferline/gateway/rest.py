"""REST callers: Envoy's gRPC-JSON transcoder in front of the public services (``Inference``, ``BatchJobs``).

``POST /inferline.v1.Inference/<Method>`` (or ``/inferline.v1.BatchJobs/<Method>``) with a
JSON body (the proto3 JSON mapping of the request message) is turned into the gRPC call by
Envoy, in C++, before any other filter runs, and the answer back into JSON. So a REST caller
passes the same routes, the same shedding (its ``x-inferline-traffic-class`` header), the same authentication
(``authorization: Bearer …``) and the same router as a gRPC caller: there is one API, the
proto, and no second server to keep in step. ``auto_mapping`` maps each method to its gRPC
path, so the protos need no ``google.api.http`` annotations. A failed call comes back with
the gRPC status turned into an HTTP one and its ``google.rpc.Status`` (details included) as
the JSON body (``convert_grpc_status``).

The transcoder needs the services' descriptors: they are taken from the generated modules
this process already imports (and the ``google.rpc`` types the error details use), so the
rendered config carries them inline and can never disagree with the router's protos.
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2

from inferline.v1 import batch_jobs_pb2, inference_pb2

REST_FILTER = "inferline.rest"
REST_SERVICES = ("inferline.v1.Inference", "inferline.v1.BatchJobs")
"""Services REST callers reach: the public API only (the internal services are never routed)."""
_TRANSCODER = "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"


def descriptor_set() -> bytes:
    """A serialized ``FileDescriptorSet`` of the public API and everything it and its error details import."""
    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: FileDescriptor) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)  # dependencies first, as protoc --include_imports writes them
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        files.file.append(proto)

    for root in (
        inference_pb2.DESCRIPTOR,
        batch_jobs_pb2.DESCRIPTOR,
        status_pb2.DESCRIPTOR,
        error_details_pb2.DESCRIPTOR,
    ):
        add(root)
    return files.SerializeToString()


def rest_filter() -> dict[str, Any]:
    """The transcoder filter, first in the chain so every later filter sees a gRPC call."""
    return {
        "name": REST_FILTER,
        "typed_config": {
            "@type": _TRANSCODER,
            "proto_descriptor_bin": base64.b64encode(descriptor_set()).decode(),
            "services": list(REST_SERVICES),
            "auto_mapping": True,
            "convert_grpc_status": True,
            # Every field in answers, zeros included: a REST caller should not have to know
            # proto3's rule that a default value is left out.
            "print_options": {"always_print_primitive_fields": True},
        },
    }
