"""`python -m frontend.keys create|list|revoke`: see frontend/security/cli.py."""

from __future__ import annotations

from frontend.security.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
