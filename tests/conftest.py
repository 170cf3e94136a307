"""Suite-wide settings: the deployment secrets every server the tests start shares.

Routers, Envoy gateways and internal services started by the tests inherit this process's
environment, so one random gateway secret and one service secret per test session make
them one deployment, as an operator's secret store would.
"""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("INFERLINE_GATEWAY_SECRET", secrets.token_urlsafe(24))
os.environ.setdefault("INFERLINE_SERVICE_SECRET", secrets.token_urlsafe(48))
