"""Inspecting and checking existing images: describe, verify, diff, extract, sign, --check."""
