"""One base for every error a user's input can cause (a bad file, config, workdir, bank...).

Entry scripts catch `FianceeError` once and print its message as one line; anything else is a
bug and keeps its traceback. It subclasses ValueError so callers that caught ValueError before
still do.
"""


class FianceeError(ValueError):
  """Bad user input: the message names the input and what was expected."""
