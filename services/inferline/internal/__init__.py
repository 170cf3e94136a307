"""The internal services' protocol (routers are their only callers; not a public contract)."""
