"""Offline replays of public traces through pdbox's own policy and autoscaler code."""
