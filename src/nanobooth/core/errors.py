"""ModelError, defined where importing it costs no torch: the run folder's checks (run_folder.py) raise
its subclass before the CLI loads the training stack. models.py re-exports it."""


class ModelError(ValueError):
    """The model cannot be loaded; the message names it and what to do."""
