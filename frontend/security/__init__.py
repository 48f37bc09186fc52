"""API keys, quotas and rate limits (docs/security.md).

Kept import-light on purpose: `frontend.generation.service` imports `accounting` from here, so this
package must not import the generation layer back.
"""
