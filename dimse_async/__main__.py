import sys

from .early_signals import catch_for

catch_for(sys.argv[1:])  # first: a server signalled while it imports stops cleanly

from .cli import console  # noqa: E402

sys.exit(console())
