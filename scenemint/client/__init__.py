"""A typed Python client for a SceneMint server, blocking (`Client`) or asyncio (`AsyncClient`).

    from scenemint.client import Client

    with Client("http://127.0.0.1:3000") as client:
        client.check_in()
        task = client.wait(client.generate("a lighthouse at dusk", size="16:9").id)
        client.download(task.id, "lighthouse.png")

The fingerprint credits are kept under is the one given, or one made once and stored in
the user's config directory (`$SCENEMINT_CONFIG_DIR` overrides it). Every failure is a
`ClientError` carrying the server's `code`, its `message` and the HTTP `status`.
"""

from ._async import AsyncClient
from ._base import Quota, Task, stored_fingerprint
from ._errors import (
    ClientError,
    ConnectionFailed,
    InvalidInputError,
    NoCreditsError,
    NotFoundError,
    ServerError,
    WaitTimeout,
)
from ._sync import Client

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "InvalidInputError",
    "NoCreditsError",
    "NotFoundError",
    "Quota",
    "ServerError",
    "Task",
    "WaitTimeout",
    "stored_fingerprint",
]
