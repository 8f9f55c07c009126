"""The base layer: errors, value types, history event kinds and payloads, JSON, name checks.

Everything else imports from here; this package imports nothing of the project's.
"""
