"""The `icd` command line: parse, call the library, report. One module per command group, imported when its
command runs (`main.COMMANDS`); the options they share are declared once (`options`)."""

from .main import main

__all__ = ["main"]
