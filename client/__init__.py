"""The embeddable client library (transport over the shared client step)."""
