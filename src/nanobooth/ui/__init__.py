"""`nanobooth ui`: the DreamBooth workflow in a local browser page (jobs.py: the training queue; app.py: the page)."""
