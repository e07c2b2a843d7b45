"""Adapter import: fetching (Tinker, folders, archives, URLs), conversion to PEFT, validation."""
