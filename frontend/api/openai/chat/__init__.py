"""/v1/chat/completions: `router.py` (HTTP only), `serving.py` (the work), `protocol.py` (models)."""
