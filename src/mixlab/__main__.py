from mixlab.cli import entry

entry()
