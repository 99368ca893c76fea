"""The `ropekit` command line."""
