"""``python -m gateway``: the front, its healer and TorchServe, as one process tree (``make serve``, the container)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from gateway.settings import SettingsError, SupervisorSettings
from gateway.supervisor import Supervisor

log = logging.getLogger("gateway")


def main() -> int:
    """Read the env contract, then supervise; a bad env exits 2 with a message saying which variable."""
    logging.basicConfig(
        level=os.environ.get("LLM_GATEWAY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx2 logs every upstream request at INFO: the healer's polls alone would be one a second.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        settings = SupervisorSettings.from_env(os.environ)
    except SettingsError as exc:
        log.error("cannot start: %s", exc)
        return 2
    return asyncio.run(Supervisor(settings).run())


if __name__ == "__main__":
    sys.exit(main())
