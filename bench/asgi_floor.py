"""The ASGI floor: a bare ASGI app answering one fixed JSON body, on the same server stack.

It runs on uvicorn with httptools (and uvloop when installed), one worker: what the
service runs on, minus everything the service does. Any request the service answers
costs at least this much; `poll_running_rps_1w` is compared against it.

Usage: python bench/asgi_floor.py --port P
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# about the size of a poll answer, so that both move the same bytes
BODY = json.dumps(
    {
        "code": 0,
        "message": "ok",
        "data": {
            "id": "00000000-0000-4000-8000-000000000000",
            "mode": "text",
            "size": "1:1",
            "status": "running",
            "createdAt": "2025-01-01T00:00:00Z",
            "updatedAt": "2025-01-01T00:00:00Z",
        },
    }
).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="auto",
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
