"""Command lines over the library, without Prefect or MLflow (``fcdpo <name> ...`` runs them too):

- ``python -m fcdpo.cli.problems``: print problems from any registered source;
- ``python -m fcdpo.cli.sample``: sample chains, sharded and resumable;
- ``python -m fcdpo.cli.evaluate``: evaluate any model (+ adapter) on any problem file.
"""

COMMANDS = ("problems", "sample", "evaluate")
