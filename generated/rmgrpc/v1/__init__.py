"""Stubs generated from protos/rmgrpc/v1 by `make proto`."""
