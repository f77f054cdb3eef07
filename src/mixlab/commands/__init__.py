"""CLI subcommands; see ``mixlab.cli``."""
