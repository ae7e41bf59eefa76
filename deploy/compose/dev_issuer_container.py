"""The development token issuer (scripts/dev_issuer.py) in a container, for `docker compose` only.

scripts/dev_issuer.py serves on 127.0.0.1, and a published port never reaches a container's
loopback: this runs the same app on every interface, changing nothing else. Compose mounts
scripts/ next to this file; the image itself carries no development tool.
"""

import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
import dev_issuer

_serve = uvicorn.run


def _on_every_interface(app: Any, **options: Any) -> None:
    _serve(app, **{**options, "host": "0.0.0.0"})  # noqa: S104  (inside its container)


if __name__ == "__main__":
    uvicorn.run = _on_every_interface
    dev_issuer.main()
