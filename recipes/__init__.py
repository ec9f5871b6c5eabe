"""Named recipe presets (YAML), shipped as package data and resolved by name."""
if __name__ != "quantsink.recipes":  # found as a top-level `recipes` from the repo root
    import os
    import runpy  # by path: importing the quantsink package here would import it for a third party

    runpy.run_path(os.path.join(os.path.dirname(__file__), os.pardir, "quantsink", "_toplevel.py"))[
        "step_aside"](__name__, __file__)
