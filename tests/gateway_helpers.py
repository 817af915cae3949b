"""`edge-chat serve` in a test: the real gateway app (sllm.edge.gateway) on uvicorn, 127.0.0.1 and a port the
OS picks, in a thread of the test process, in front of a real cloud server; stopped on exit."""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

from sllm import edge
from sllm.edge.conversations import Conversations
from sllm.edge.gateway import create_app, serve


@contextlib.contextmanager
def running_gateway(cloud_address: str, runtime, *, conversations: int = 64, **app_options) -> Iterator[tuple]:
    """(base URL "http://127.0.0.1:PORT", the Conversations pool) of a gateway talking to `cloud_address`."""
    pool = Conversations(functools.partial(edge.connect, cloud_address, runtime), conversations)
    app = create_app(pool, runtime.model_id, **app_options)
    started, box = threading.Event(), {}

    def ready(address: str, stop) -> None:
        box.update(address=address, stop=stop)
        started.set()

    thread = threading.Thread(target=serve, args=(app, "127.0.0.1", 0), kwargs=dict(ready=ready), daemon=True)
    thread.start()
    assert started.wait(30), "the gateway did not start"
    try:
        yield f"http://{box['address']}", pool
    finally:
        box["stop"]()
        thread.join(30)
