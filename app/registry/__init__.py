"""The registry: tables, queries and migrations for models, jobs and (later) every artifact."""
