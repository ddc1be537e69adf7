"""The archive behind ``dimse-async serve``: an application built on the framework's
public API (SQLite index, PS3.4 C.2.2 matching, TOML configuration)."""
