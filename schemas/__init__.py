"""The JSON Schemas of a request row, an output row and the manifest, shipped as package data."""
