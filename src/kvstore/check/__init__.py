"""Histories and their linearizability checker: pure data and computation, no network."""
