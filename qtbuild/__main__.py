"""``python -m qtbuild``: the same as the ``qtbuild`` command."""

from qtbuild.cli import main

main()
