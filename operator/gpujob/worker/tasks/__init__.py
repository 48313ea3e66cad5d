"""Reference tasks: small but real torch work that produces real files (see ../README.md)."""
