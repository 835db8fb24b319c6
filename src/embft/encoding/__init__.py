"""Encoding: model folders, how both sides of a comparison encode (settings, precision)."""
