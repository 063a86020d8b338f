"""Test-wide isolation: every pytest session gets its own PREFECT_HOME (results, cache, SQLite DB).

Prefect reads its settings when first imported, so this runs before any test module imports it.
"""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="kling-tests-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# The project's own credentials must never leak in from the developer's shell into tests.
for _name in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY", "COMETAPI_KEY", "KLING_API_BASE_URL", "KLING_PROVIDER"):
    os.environ.pop(_name, None)
