"""Small data that ships with pytrain, so the main job runs with no downloads."""
from importlib import resources


def default_corpus() -> str:
    """The embedded training text (plain ASCII prose written for pytrain, about 6 KB)."""
    return resources.files(__package__).joinpath("corpus.txt").read_text(encoding="ascii")
