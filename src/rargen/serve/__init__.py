"""Serving: the local web page and JSON API (HTTP), the generation engine behind it, and continuous
batching."""
