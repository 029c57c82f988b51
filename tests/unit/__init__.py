"""Unit tests: one file per module of `conversion/`, in memory where the module allows."""
