"""Named recipe presets (YAML), shipped as package data and resolved by name."""
