"""Data that ships with the service: the starter questions for the embedded default profile."""
