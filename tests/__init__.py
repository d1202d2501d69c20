"""The steptrack test suite."""
