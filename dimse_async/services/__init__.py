"""Service classes (PS3.4) built on associations: request objects and helpers."""
