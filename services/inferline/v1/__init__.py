"""Generated protobuf and gRPC code for inferline.v1 (do not edit)."""
