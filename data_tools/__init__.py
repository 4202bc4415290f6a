"""mmspec.data_tools."""
