"""Shared building blocks: configuration, deadlines, errors, auth, gRPC server plumbing."""
