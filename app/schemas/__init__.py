"""Request and response bodies of the HTTP API (v1), one module per resource, as its routes
in `app/api/` are; what they share is in `common`. Tables live in `app.registry.tables`."""
