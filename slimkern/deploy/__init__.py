"""A real parallel ParaDiS deployment: each exported branch of a switch in its own worker
process (one CPU thread each), the input sent to every worker, the partial outputs fused in
the coordinator (``ParallelDeployment``, ``deploy``); ``slimkern.deploy.bench`` measures
latency and throughput (``slimkern deploy``)."""
from slimkern.deploy.coordinator import ParallelDeployment, deploy

__all__ = ["ParallelDeployment", "deploy"]
