"""Meshes, sharding rules and multi-host set-up."""
