"""Parsers of what users send or name: uploaded datasets and archives, request documents,
model and adapter sources, GGUF headers, and files read from user-named paths. Everything
here treats its input as hostile and refuses it with a message naming the problem."""
