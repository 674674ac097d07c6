from compactmind.cli import entry

entry()
