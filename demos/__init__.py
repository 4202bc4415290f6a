"""mmspec.demos."""
