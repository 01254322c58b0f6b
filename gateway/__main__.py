"""``python -m gateway``: the container entrypoint (TorchServe + gateway)."""

from __future__ import annotations

import logging
import os
import signal
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
    try:
        settings = SupervisorSettings.from_env(os.environ)
    except SettingsError as exc:
        log.error("cannot start: %s", exc)
        return 2
    supervisor = Supervisor(settings)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
