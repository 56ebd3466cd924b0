"""The shipped sweep specs (YAML), installed as the package data `dcmtune.search_spaces`."""
