"""``python -m tmdht.cli``: the same as the ``tmdht`` command."""

from tmdht.cli import main

main()
