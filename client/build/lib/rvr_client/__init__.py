"""Python client of rvr-serve: refine, generate and judge images, follow jobs, verify webhooks.

from rvr_client import Client

with Client("http://127.0.0.1:8000", api_key="...") as rvr:
    out = rvr.refine("in.png", "two red apples", seed=42)
    out.save("refined.png")
"""

from rvr_client._async import AsyncClient, AsyncJob
from rvr_client._protocol import __version__
from rvr_client._sync import Client, Job
from rvr_client.errors import (
    ConnectionFailed,
    InvalidInput,
    JobCancelled,
    JobFailed,
    NotFound,
    Overloaded,
    RvrError,
    ServerError,
    Unauthorized,
    WaitTimeout,
)
from rvr_client.events import (
    CancelledEvent,
    CompletedEvent,
    Event,
    FailedEvent,
    PreviewEvent,
    ProgressEvent,
    QueuedEvent,
    StartedEvent,
)
from rvr_client.results import JobStatus, JudgeResult, Result
from rvr_client.retry import RetryPolicy
from rvr_client.webhooks import WebhookVerificationError, sign, signing_key, verify_webhook

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "CancelledEvent",
    "Client",
    "CompletedEvent",
    "ConnectionFailed",
    "Event",
    "FailedEvent",
    "InvalidInput",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobStatus",
    "JudgeResult",
    "NotFound",
    "Overloaded",
    "PreviewEvent",
    "ProgressEvent",
    "QueuedEvent",
    "Result",
    "RetryPolicy",
    "RvrError",
    "ServerError",
    "StartedEvent",
    "Unauthorized",
    "WaitTimeout",
    "WebhookVerificationError",
    "__version__",
    "sign",
    "signing_key",
    "verify_webhook",
]
