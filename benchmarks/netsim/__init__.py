"""Slow-network testbed: network namespaces behind a rate-limited bridge, and a torchrun launcher."""

from netsim.netsim import Cluster, Host, Result, available, cleanup, measure_allreduce, parse_rate

__all__ = ["Cluster", "Host", "Result", "available", "cleanup", "measure_allreduce", "parse_rate"]
