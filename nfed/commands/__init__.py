"""Click commands of the `nfed` CLI, one module per area; `nfed.cli` loads them lazily."""
