"""Generated protobuf and gRPC code for inferline.internal.v1 (do not edit)."""
