"""Generated gRPC and protobuf stubs of the ``mtrremu.v1`` API (built from ``protos/``)."""
