"""The Python SDK for the Apoptosis HTTP API: `from service.client import Client`. HTTP only, no
server and no torch (`pip install apoptosis`); the CLI's client commands use it too."""

from service.client.formats import UnknownFormat
from service.client.sdk import ApiError, Client, JobFailed, PruneResult

__all__ = ["ApiError", "Client", "JobFailed", "PruneResult", "UnknownFormat"]
