"""Named recipe presets (YAML), shipped as package data and resolved by name."""
if __name__ != "quantsink.recipes":  # found as a top-level `recipes` from the repo root
    from quantsink._toplevel import step_aside

    step_aside(__name__, __file__)
