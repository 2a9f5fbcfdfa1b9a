"""The infermesh services: one package per component, shared bootstrap in `common`."""
